// Exceptions thrown by the C++ core. bindings.cpp maps each one onto the
// matching class in kvsnap.errors, so Python sees one hierarchy.
#pragma once

#include <stdexcept>
#include <string>

namespace kvsnap {

// A caller passed a value that cannot be used; `argument` names it.
struct InvalidArgument : std::invalid_argument {
  std::string argument;
  InvalidArgument(std::string arg, const std::string& msg)
      : std::invalid_argument(arg + ": " + msg), argument(std::move(arg)) {}
};

// The arena has no free slot left.
struct ArenaFull : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A slot index that is out of range, already free (use after free or double
// free), or otherwise not usable for the requested operation.
struct SlotError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The requested device has no kernel for this operation.
struct DeviceUnsupported : std::runtime_error {
  using std::runtime_error::runtime_error;
};

} // namespace kvsnap
