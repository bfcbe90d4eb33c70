// Argument checks and invariants of the C++ launch path, raised as standard exceptions whose
// messages are built without iostreams.
//
// Neither TORCH_CHECK nor c10::str: on the H200 machine (torch 2.11.0+cu130, this module built
// by g++ 13.3; 2026-11-27) every error raised here with a message that c10::str built from
// several parts (through std::ostringstream, as TORCH_CHECK does) crashed the process, a
// std::runtime_error carrying such a message included, and so did a failing TORCH_CHECK in a
// minimal extension; errors whose message was one literal reached Python. Which step crashes
// is not pinned down (no debugger there): bench/cpp_error_check.py tells the cases apart on the
// next GPU run (bench/results/h200/run5_cpp_errors.md). Messages here are built from
// std::string and std::to_string only.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

namespace mtmm::detail {

inline void append(std::string& out, const char* text) { out += text; }
inline void append(std::string& out, const std::string& text) { out += text; }
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& out, T value) {
  out += std::to_string(value);
}

template <typename... Args>
std::string message(const Args&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

}  // namespace mtmm::detail

// Raises RuntimeError in Python, with the arguments (strings and numbers) as the message.
#define MTMM_CHECK(cond, ...)                                                     \
  do {                                                                            \
    if (!(cond)) throw std::runtime_error(::mtmm::detail::message(__VA_ARGS__)); \
  } while (false)

// An invariant of this code, not of the caller's arguments: a failure is a bug here.
#define MTMM_ASSERT(cond, ...)                                                                \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      throw std::logic_error(::mtmm::detail::message("mtmm internal error at ", __FILE__, ":", \
                                                     __LINE__, ": ", __VA_ARGS__));           \
    }                                                                                         \
  } while (false)
