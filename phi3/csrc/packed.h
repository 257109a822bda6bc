/* What packed.c exports to layer.c: the linears' loops as orphaned `omp for`s (see packed.c). */
#include <stdint.h>

void phi3_q4_rows(const float *x, const uint8_t *w, const uint16_t *scales, const uint16_t *biases, float *y,
                  int64_t M, int64_t N, int64_t K, int64_t G);
void phi3_q8_rows(const float *x, const int8_t *w, const uint16_t *scales, float *y,
                  int64_t M, int64_t N, int64_t K, int64_t G);
void phi3_f32_rows(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K);
void phi3_a16_rows(const float *x, const void *w, const uint16_t *scales, const uint16_t *biases, float *y,
                   int64_t M, int64_t N, int64_t K, int64_t G, float *work);
int64_t phi3_a16_work_floats(int64_t M, int64_t K);
