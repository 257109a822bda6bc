/* What packed.c exports to layer.c: the packed linears' loops as orphaned `omp for`s (see packed.c). */
#include <stdint.h>

void phi3_q4_rows(const float *x, const uint8_t *w, const uint16_t *scales, const uint16_t *biases, float *y,
                  int64_t M, int64_t N, int64_t K, int64_t G);
void phi3_q8_rows(const float *x, const int8_t *w, const uint16_t *scales, float *y,
                  int64_t M, int64_t N, int64_t K, int64_t G);
