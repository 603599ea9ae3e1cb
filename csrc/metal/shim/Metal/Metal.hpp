// A stand-in for Apple's metal-cpp <Metal/Metal.hpp>, declaring just what
// MLX's mlx/backend/metal/device.h and kvsnap's csrc/metal/primitives.cpp
// use, so that g++ -fsyntax-only can type-check primitives.cpp on Linux
// (tools/check_metal.py). Declarations only: nothing here is ever linked.
#pragma once

#include <cstdint>

namespace NS {
using UInteger = unsigned long;
using Integer = long;

template <typename T>
class SharedPtr {
 public:
  ~SharedPtr();
  T* get() const;
  T* operator->() const;
  explicit operator bool() const;
};
template <typename T>
SharedPtr<T> TransferPtr(T* p);
template <typename T>
SharedPtr<T> RetainPtr(T* p);

class Object {
 public:
  void release();
  Object* retain();
};
class AutoreleasePool : public Object {};
class String : public Object {
 public:
  const char* utf8String() const;
};
class Error : public Object {
 public:
  String* localizedDescription() const;
};
} // namespace NS

namespace MTL {

enum ResourceOptions : NS::UInteger {
  ResourceStorageModeShared = 0,
  ResourceHazardTrackingModeUntracked = 1 << 8,
};
inline ResourceOptions operator|(ResourceOptions a, ResourceOptions b) {
  return ResourceOptions(NS::UInteger(a) | NS::UInteger(b));
}
enum class DataType : NS::UInteger { None = 0 };
enum BarrierScope : NS::UInteger { BarrierScopeBuffers = 1 };

struct Size {
  Size(NS::UInteger width, NS::UInteger height, NS::UInteger depth);
  NS::UInteger width, height, depth;
};

class Allocation : public NS::Object {};
class Resource : public Allocation {};
class Buffer : public Resource {
 public:
  void* contents();
  NS::UInteger length() const;
};
class ResidencySet : public NS::Object {};
class Fence : public NS::Object {};
class Function : public NS::Object {};
class LinkedFunctions : public NS::Object {};
class Library : public NS::Object {};
class ComputePipelineState : public NS::Object {
 public:
  NS::UInteger maxTotalThreadsPerThreadgroup() const;
};
class ComputeCommandEncoder : public NS::Object {
 public:
  void setComputePipelineState(const ComputePipelineState* state);
  void setBytes(const void* bytes, NS::UInteger length, NS::UInteger index);
  void setBuffer(const Buffer* buffer, NS::UInteger offset, NS::UInteger index);
  void setThreadgroupMemoryLength(NS::UInteger length, NS::UInteger index);
  void memoryBarrier(BarrierScope scope);
};
class CommandBuffer : public NS::Object {};
class CommandQueue : public NS::Object {};
class Device : public NS::Object {
 public:
  // bytesNoCopy when a deallocator (here: nullptr) is given.
  Buffer* newBuffer(const void* pointer, NS::UInteger length, ResourceOptions options,
                    void (*deallocator)(void*, NS::UInteger));
  Buffer* newBuffer(NS::UInteger length, ResourceOptions options);
};

} // namespace MTL
