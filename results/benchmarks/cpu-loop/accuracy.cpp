// exp/sigmoid/tanh of _loops.cpp (copied from it at 20eacb5) against float64 libm on 2M points, and
// a hash of all results, to compare builds: g++ -std=c++17 -O3 [-mavx2|-mavx512f|-O0]
// -fno-trapping-math -fno-math-errno -ffp-contract=off accuracy.cpp -o accuracy && ./accuracy
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <vector>
inline float exp_poly(float x) {
  // Written as selects and a truncation, which every vector width compiles without branches.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = floor(x log2(e) + 1/2), by truncating a number made positive (-87 <= x <= 88)
  const int32_t n = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;
  const float fn = static_cast<float>(n);
  const float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

inline float sigmoid_of(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

// tanh in float32 (Cephes' tanhf): an odd polynomial below |x| = 0.625, where 1 - 2/(e^2x + 1)
// would lose digits, and that formula above it (tanh(9) is 1 in float32).
inline float tanh_of(float x) {
  const float a = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float e = exp_poly(2.0f * (a < 9.0f ? a : 9.0f));
  const float large = std::copysign(1.0f - 2.0f / (e + 1.0f), x);
  return a < 0.625f ? small : large;
}


static double ulp(float v) { return std::nextafter(std::fabs(v), INFINITY) - std::fabs(v); }
int main() {
  const int N = 2000001;
  std::vector<float> x(N), e(N), s(N), t(N);
  for (int i = 0; i < N; ++i) x[i] = -20.0f + 40.0f * i / (N - 1);
  for (int i = 0; i < N; ++i) { e[i] = exp_poly(x[i] * 4.0f); s[i] = sigmoid_of(x[i]); t[i] = tanh_of(x[i]); }
  double me = 0, ms = 0, mt = 0;
  for (int i = 0; i < N; ++i) {
    double xe = (double)(x[i] * 4.0f);
    if (xe > -87 && xe < 88) me = std::max(me, std::fabs(e[i] - std::exp(xe)) / ulp((float)std::exp(xe)));
    double rs = 1.0 / (1.0 + std::exp(-(double)x[i])); if (rs > 1e-30) ms = std::max(ms, std::fabs(s[i] - rs) / ulp((float)rs));
    double rt = std::tanh((double)x[i]); if (rt != 0) mt = std::max(mt, std::fabs(t[i] - rt) / ulp((float)rt));
  }
  unsigned long long h = 0; for (int i = 0; i < N; ++i) { uint32_t b; std::memcpy(&b, &s[i], 4); h = h * 31 + b; std::memcpy(&b, &t[i], 4); h = h * 31 + b; std::memcpy(&b, &e[i], 4); h = h * 31 + b; }
  printf("max error in ulp: exp %.2f sigmoid %.2f tanh %.2f  hash %llx\n", me, ms, mt, h);
}
