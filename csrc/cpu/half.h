// Portable float16 / bfloat16 <-> float conversions (round to nearest even).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace tangle {

struct f16 { uint16_t x; };
struct bf16 { uint16_t x; };

static inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float to_float(f16 h) {
  uint32_t sign = uint32_t(h.x & 0x8000u) << 16;
  uint32_t exp = (h.x >> 10) & 0x1fu;
  uint32_t mant = h.x & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in float
    float v = float(mant) * 5.9604644775390625e-08f;
    return bits_to_float(float_to_bits(v) | sign);
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

static inline f16 from_float_f16(float x) {
  uint32_t f = float_to_bits(x);
  uint16_t sign = uint16_t((f >> 16) & 0x8000u);
  uint32_t a = f & 0x7fffffffu;
  if (a >= 0x7f800000u) return f16{uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u))};
  if (a >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                       // below 2^-14: subnormal half
    uint32_t m = uint32_t(std::nearbyint(bits_to_float(a) * 16777216.0f));
    return f16{uint16_t(sign | m)};
  }
  uint32_t mant = a & 0x7fffffu;
  uint32_t h = ((((a >> 23) - 127u + 15u)) << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return f16{uint16_t(sign | h)};
}

static inline float to_float(bf16 b) { return bits_to_float(uint32_t(b.x) << 16); }

static inline bf16 from_float_bf16(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

template <typename T> struct Conv;
template <> struct Conv<float> {
  using acc = float;
  static inline float load(float v) { return v; }
  static inline float store(float v) { return v; }
};
template <> struct Conv<double> {
  using acc = double;
  static inline double load(double v) { return v; }
  static inline double store(double v) { return v; }
};
template <> struct Conv<f16> {
  using acc = float;
  static inline float load(f16 v) { return to_float(v); }
  static inline f16 store(float v) { return from_float_f16(v); }
};
template <> struct Conv<bf16> {
  using acc = float;
  static inline float load(bf16 v) { return to_float(v); }
  static inline bf16 store(float v) { return from_float_bf16(v); }
};

}  // namespace tangle
