// Compile-time specialisation from runtime choices (after Dao-AILab/causal-conv1d's
// static_switch.h): the body, a lambda, is instantiated once per value with CONST_NAME a
// constexpr, so kernel size, stride and vector width are template parameters of the kernels.
// The host validates the values first; the last branch takes the remaining valid value.
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr bool CONST_NAME = true;         \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr bool CONST_NAME = false;        \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// kernel size: 3 or 5
#define KERNEL_SIZE_SWITCH(VALUE, CONST_NAME, ...) \
  [&] {                                            \
    if ((VALUE) == 3) {                            \
      constexpr int CONST_NAME = 3;                \
      return __VA_ARGS__();                        \
    } else {                                       \
      constexpr int CONST_NAME = 5;                \
      return __VA_ARGS__();                        \
    }                                              \
  }()

// convolution stride: 1 or 2
#define STRIDE_SWITCH(VALUE, CONST_NAME, ...) \
  [&] {                                       \
    if ((VALUE) == 1) {                       \
      constexpr int CONST_NAME = 1;           \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr int CONST_NAME = 2;           \
      return __VA_ARGS__();                   \
    }                                         \
  }()
