// TVM's CUDA device and CUDA modules on the NVIDIA driver API alone.
//
// Why: TVM's CUDA runtime library from PyPI (libtvm_runtime_cuda.so) links the CUDA runtime of
// the CUDA version it was built with (libcudart.so.13), while a stock Jetson Orin runs JetPack 6,
// CUDA 12.6, and will stay on the CUDA 12 line. The driver library (libcuda.so.1) is the one CUDA
// library every board with an NVIDIA GPU has, whatever its CUDA version, and what a model needs
// from CUDA at run time is small: memory, copies, a stream to wait on, and launching the kernels
// embedded in the model library (cubins built for the board's CUDA version). So the runner
// implements those on the driver API, opened with dlopen (a CPU-only board runs CPU artifacts
// without any NVIDIA library), and registers them under the names TVM's runtime looks up:
//
//   "device_api.cuda"                  the device API for kDLCUDA (a DeviceAPI subclass):
//                                      cuMemAlloc/cuMemFree, cuMemcpy*Async, cuStreamSynchronize,
//                                      kernels' scratch (workspaces) kept per thread for reuse
//   "ffi.Module.load_from_bytes.cuda"  the loader of the CUDA module a model library embeds:
//                                      cuModuleLoadData, cuModuleGetFunction, cuLaunchKernel
//
// The CUDA module's bytes are TVM's serialisation (src/support/serializer.h: little-endian
// integers, u64-length strings and arrays): the format name ("cubin", "ptx" or "fatbin"), a map
// from kernel name to its FunctionInfo (name, argument dtypes, launch parameter tags, extra
// argument tags), then the image. A kernel's packed call carries its arguments (device pointers,
// integers, floats) followed by one int64 per launch parameter tag (the extents of blockIdx.* and
// threadIdx.*, and the dynamic shared memory size last when tagged), exactly as TVM's host code
// passes them to TVM's own CUDA module (src/backend/cuda/runtime/cuda_module.cc and
// src/runtime/pack_args.h, whose argument conversions and zero-extent rule this file follows).
// Launch features moec's kernels never use (thread block clusters, cooperative or programmatic
// dependent launch, tensor-map arguments) are refused when the module loads, naming the kernel.
//
// One context per device: the device's primary context, made current on the calling thread by
// every entry point. Errors are one-line std::runtime_error messages (tvm::ffi::Error where TVM
// calls in), naming the driver call, the CUDA error and what to do.

#include "cuda_driver.h"

#include <dlfcn.h>
#include <tvm/ffi/cast.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>
#include <tvm/runtime/device_api.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace moec {
namespace {

namespace ffi = tvm::ffi;
using tvm::runtime::DeviceAttrKind;

// ---------------------------------------------------------------------------------------------
// The driver API: the few types, constants and entry points used here (values from cuda.h,
// stable since CUDA 4; the _v2 names are the 64-bit ones every driver since CUDA 3.2 exports).

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = uintptr_t;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;

constexpr CUresult kSuccess = 0;
constexpr CUresult kErrorDeinitialized = 4;    // the driver is shutting down (process exit)
constexpr CUresult kErrorNoDevice = 100;       // CUDA_ERROR_NO_DEVICE
constexpr CUresult kErrorNoBinaryForGpu = 209;  // CUDA_ERROR_NO_BINARY_FOR_GPU
constexpr int kAttrMaxThreadsPerBlock = 1;
constexpr int kAttrMaxBlockDimX = 2;
constexpr int kAttrMaxSharedMemoryPerBlock = 8;
constexpr int kAttrWarpSize = 10;
constexpr int kAttrMaxRegistersPerBlock = 12;
constexpr int kAttrClockRate = 13;
constexpr int kAttrMultiprocessorCount = 16;
constexpr int kAttrL2CacheSize = 38;
constexpr int kAttrComputeCapabilityMajor = 75;
constexpr int kAttrComputeCapabilityMinor = 76;
constexpr int kFuncAttrMaxDynamicSharedSizeBytes = 8;
constexpr size_t kDefaultSharedMemoryLimit = 48 << 10;  // more must be opted into per kernel
constexpr int kMaxDevices = 32;

struct Driver {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDriverGetVersion)(int*);
  CUresult (*cuDeviceGetCount)(int*);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetName)(char*, int, CUdevice);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuDeviceTotalMem)(size_t*, CUdevice);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuMemAlloc)(CUdeviceptr*, size_t);
  CUresult (*cuMemFree)(CUdeviceptr);
  CUresult (*cuMemGetInfo)(size_t*, size_t*);
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr, const void*, size_t, CUstream);
  CUresult (*cuMemcpyDtoHAsync)(void*, CUdeviceptr, size_t, CUstream);
  CUresult (*cuMemcpyDtoDAsync)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
  CUresult (*cuStreamCreate)(CUstream*, unsigned);
  CUresult (*cuStreamDestroy)(CUstream);
  CUresult (*cuStreamSynchronize)(CUstream);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuFuncSetAttribute)(CUfunction, int, int);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void**, void**);
  CUresult (*cuGetErrorName)(CUresult, const char**);
  CUresult (*cuEventCreate)(CUevent*, unsigned);
  CUresult (*cuEventRecord)(CUevent, CUstream);
  CUresult (*cuEventSynchronize)(CUevent);
  CUresult (*cuEventElapsedTime)(float*, CUevent, CUevent);
};

const Driver* g_driver = nullptr;  // set once by InstallCudaDriverRuntime, never freed

// "CUDA_ERROR_NO_DEVICE" for `result` (its number when the driver does not know it).
std::string ErrorName(CUresult result) {
  const char* name = nullptr;
  if (g_driver != nullptr && g_driver->cuGetErrorName(result, &name) == kSuccess && name != nullptr) return name;
  return "CUDA error " + std::to_string(result);
}

// Throws a one-line tvm::ffi::Error ("CUDAError") when `result` is not success: the runner
// prints it as "moec-runner: error: CUDAError: <what> failed: <CUDA error>".
void Check(CUresult result, const std::string& what) {
  if (result != kSuccess) TVM_FFI_THROW(CUDAError) << what << " failed: " << ErrorName(result);
}

template <typename F>
void Resolve(void* library, const char* name, F* slot) {
  void* symbol = dlsym(library, name);
  if (symbol == nullptr) {
    throw std::runtime_error(std::string("the NVIDIA driver library libcuda.so.1 lacks ") + name +
                             "; update the NVIDIA driver");
  }
  *slot = reinterpret_cast<F>(symbol);
}

const Driver* OpenDriver() {
  void* library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* why = dlerror();
    throw std::runtime_error(std::string("this artifact runs on a CUDA GPU but the NVIDIA driver library "
                                         "libcuda.so.1 cannot be loaded (") +
                             (why ? why : "not found") +
                             "); install the NVIDIA driver (on a Jetson board: JetPack)");
  }
  auto* driver = new Driver();
  Resolve(library, "cuGetErrorName", &driver->cuGetErrorName);
  Resolve(library, "cuInit", &driver->cuInit);
  Resolve(library, "cuDriverGetVersion", &driver->cuDriverGetVersion);
  Resolve(library, "cuDeviceGetCount", &driver->cuDeviceGetCount);
  Resolve(library, "cuDeviceGet", &driver->cuDeviceGet);
  Resolve(library, "cuDeviceGetName", &driver->cuDeviceGetName);
  Resolve(library, "cuDeviceGetAttribute", &driver->cuDeviceGetAttribute);
  Resolve(library, "cuDeviceTotalMem_v2", &driver->cuDeviceTotalMem);
  Resolve(library, "cuDevicePrimaryCtxRetain", &driver->cuDevicePrimaryCtxRetain);
  Resolve(library, "cuCtxGetCurrent", &driver->cuCtxGetCurrent);
  Resolve(library, "cuCtxSetCurrent", &driver->cuCtxSetCurrent);
  Resolve(library, "cuMemAlloc_v2", &driver->cuMemAlloc);
  Resolve(library, "cuMemFree_v2", &driver->cuMemFree);
  Resolve(library, "cuMemGetInfo_v2", &driver->cuMemGetInfo);
  Resolve(library, "cuMemcpyHtoDAsync_v2", &driver->cuMemcpyHtoDAsync);
  Resolve(library, "cuMemcpyDtoHAsync_v2", &driver->cuMemcpyDtoHAsync);
  Resolve(library, "cuMemcpyDtoDAsync_v2", &driver->cuMemcpyDtoDAsync);
  Resolve(library, "cuStreamCreate", &driver->cuStreamCreate);
  Resolve(library, "cuStreamDestroy_v2", &driver->cuStreamDestroy);
  Resolve(library, "cuStreamSynchronize", &driver->cuStreamSynchronize);
  Resolve(library, "cuModuleLoadData", &driver->cuModuleLoadData);
  Resolve(library, "cuModuleGetFunction", &driver->cuModuleGetFunction);
  Resolve(library, "cuFuncSetAttribute", &driver->cuFuncSetAttribute);
  Resolve(library, "cuLaunchKernel", &driver->cuLaunchKernel);
  Resolve(library, "cuEventCreate", &driver->cuEventCreate);
  Resolve(library, "cuEventRecord", &driver->cuEventRecord);
  Resolve(library, "cuEventSynchronize", &driver->cuEventSynchronize);
  Resolve(library, "cuEventElapsedTime", &driver->cuEventElapsedTime);
  return driver;
}

// ---------------------------------------------------------------------------------------------
// Devices: each one's primary context, retained on first use and made current per call.

struct Devices {
  std::mutex mutex;
  int count = 0;
  std::array<CUcontext, kMaxDevices> contexts{};
};

Devices& AllDevices() {
  static auto* devices = new Devices();  // never destroyed: the VM may free memory at exit
  return *devices;
}

thread_local int t_current_device = 0;  // set by DeviceAPI::SetDevice, as cudaSetDevice is

CUdevice DeviceHandle(int device_id) {
  Devices& devices = AllDevices();
  if (device_id < 0 || device_id >= devices.count) {
    TVM_FFI_THROW(CUDAError) << "no CUDA device " << device_id << " (the driver reports " << devices.count << ")";
  }
  CUdevice device = 0;
  Check(g_driver->cuDeviceGet(&device, device_id), "cuDeviceGet");
  return device;
}

// Makes device `device_id`'s primary context current on this thread.
void Bind(int device_id) {
  Devices& devices = AllDevices();
  CUcontext context = nullptr;
  {
    std::lock_guard<std::mutex> lock(devices.mutex);
    if (device_id >= 0 && device_id < devices.count && devices.contexts[device_id] != nullptr) {
      context = devices.contexts[device_id];
    } else {
      Check(g_driver->cuDevicePrimaryCtxRetain(&context, DeviceHandle(device_id)), "cuDevicePrimaryCtxRetain");
      devices.contexts[device_id] = context;
    }
  }
  CUcontext current = nullptr;
  if (g_driver->cuCtxGetCurrent(&current) != kSuccess || current != context) {
    Check(g_driver->cuCtxSetCurrent(context), "cuCtxSetCurrent");
  }
}

// cuMemFree; after the driver has shut down (at process exit) there is nothing left to free.
void FreeDeviceMemory(int device_id, void* pointer) {
  Bind(device_id);
  CUresult result = g_driver->cuMemFree(reinterpret_cast<CUdeviceptr>(pointer));
  if (result != kErrorDeinitialized) Check(result, "cuMemFree");
}

int Attribute(int attribute, int device_id) {
  int value = 0;
  Check(g_driver->cuDeviceGetAttribute(&value, attribute, DeviceHandle(device_id)), "cuDeviceGetAttribute");
  return value;
}

std::string DeviceName(int device_id) {
  char name[256] = {0};
  Check(g_driver->cuDeviceGetName(name, sizeof(name) - 1, DeviceHandle(device_id)), "cuDeviceGetName");
  return name;
}

std::string ComputeArch(int device_id) {  // "sm_90"
  return "sm_" + std::to_string(Attribute(kAttrComputeCapabilityMajor, device_id)) +
         std::to_string(Attribute(kAttrComputeCapabilityMinor, device_id));
}

// ---------------------------------------------------------------------------------------------
// Workspaces: the scratch a model function allocates for one call of its kernels
// (TVMBackendAllocWorkspace; e.g. expert_down's per-pair partial rows). A freed workspace is kept
// for the thread's next calls instead of being returned to the driver: cuMemFree waits for the
// whole device and cuMemAlloc costs microseconds, and both would come on every call of the model.
// Reuse is safe because one thread's kernels and copies run in order on one stream. TVM's own CUDA
// runtime pools workspaces per thread in the same way.

class WorkspacePool {
 public:
  ~WorkspacePool() {  // at thread exit; never throws (a driver error here has no one to tell)
    for (auto& [device_id, blocks] : free_) {
      for (auto& block : blocks) {
        try {
          FreeDeviceMemory(device_id, block.second);
        } catch (...) {
        }
      }
    }
  }

  // A kept workspace of at least `nbytes` on `device_id` (the smallest), or nullptr.
  void* Take(int device_id, size_t nbytes) {
    auto& blocks = free_[device_id];
    auto found = blocks.lower_bound(nbytes);
    if (found == blocks.end()) return nullptr;
    void* pointer = found->second;
    sizes_[pointer] = found->first;
    blocks.erase(found);
    return pointer;
  }

  void Lent(void* pointer, size_t nbytes) { sizes_[pointer] = nbytes; }

  // Keeps a workspace this pool lent; false for any other pointer.
  bool Keep(int device_id, void* pointer) {
    auto lent = sizes_.find(pointer);
    if (lent == sizes_.end()) return false;
    free_[device_id].emplace(lent->second, pointer);
    sizes_.erase(lent);
    return true;
  }

 private:
  std::map<int, std::multimap<size_t, void*>> free_;  // by device: size -> workspace
  std::map<void*, size_t> sizes_;                     // lent: workspace -> size
};

thread_local WorkspacePool t_workspaces;

// ---------------------------------------------------------------------------------------------
// The device API TVM's runtime (the VM's allocator, tensor copies, stream syncs) calls for kDLCUDA.

class DriverDeviceAPI final : public tvm::runtime::DeviceAPI {
 public:
  void SetDevice(DLDevice dev) final {
    Bind(dev.device_id);
    t_current_device = dev.device_id;
  }

  void GetAttr(DLDevice dev, DeviceAttrKind kind, ffi::Any* rv) final {
    if (kind == tvm::runtime::kExist) {
      *rv = static_cast<int>(dev.device_id >= 0 && dev.device_id < AllDevices().count);
      return;
    }
    const int id = dev.device_id;
    switch (kind) {
      case tvm::runtime::kMaxThreadsPerBlock:
        *rv = Attribute(kAttrMaxThreadsPerBlock, id);
        break;
      case tvm::runtime::kWarpSize:
        *rv = Attribute(kAttrWarpSize, id);
        break;
      case tvm::runtime::kMaxSharedMemoryPerBlock:
        *rv = Attribute(kAttrMaxSharedMemoryPerBlock, id);
        break;
      case tvm::runtime::kComputeVersion:
        *rv = ffi::String(std::to_string(Attribute(kAttrComputeCapabilityMajor, id)) + "." +
                          std::to_string(Attribute(kAttrComputeCapabilityMinor, id)));
        break;
      case tvm::runtime::kDeviceName:
        *rv = ffi::String(DeviceName(id));
        break;
      case tvm::runtime::kMaxClockRate:
        *rv = Attribute(kAttrClockRate, id);
        break;
      case tvm::runtime::kMultiProcessorCount:
        *rv = Attribute(kAttrMultiprocessorCount, id);
        break;
      case tvm::runtime::kMaxThreadDimensions:
        *rv = ffi::String("[" + std::to_string(Attribute(kAttrMaxBlockDimX, id)) + ", " +
                          std::to_string(Attribute(kAttrMaxBlockDimX + 1, id)) + ", " +
                          std::to_string(Attribute(kAttrMaxBlockDimX + 2, id)) + "]");
        break;
      case tvm::runtime::kMaxRegistersPerBlock:
        *rv = Attribute(kAttrMaxRegistersPerBlock, id);
        break;
      case tvm::runtime::kApiVersion:
      case tvm::runtime::kDriverVersion: {
        int version = 0;
        Check(g_driver->cuDriverGetVersion(&version), "cuDriverGetVersion");
        *rv = version;
        break;
      }
      case tvm::runtime::kL2CacheSizeBytes:
        *rv = Attribute(kAttrL2CacheSize, id);
        break;
      case tvm::runtime::kTotalGlobalMemory: {
        size_t bytes = 0;
        Check(g_driver->cuDeviceTotalMem(&bytes, DeviceHandle(id)), "cuDeviceTotalMem");
        *rv = static_cast<int64_t>(bytes);
        break;
      }
      case tvm::runtime::kAvailableGlobalMemory: {
        Bind(id);
        size_t free = 0, total = 0;
        Check(g_driver->cuMemGetInfo(&free, &total), "cuMemGetInfo");
        *rv = static_cast<int64_t>(free);
        break;
      }
      default:
        break;  // not a CUDA attribute (kGcnArch, kImagePitchAlignment): left unset, as TVM does
    }
  }

  void* AllocDataSpace(DLDevice dev, size_t nbytes, size_t alignment, DLDataType) final {
    if (alignment == 0 || 256 % alignment != 0) {
      TVM_FFI_THROW(CUDAError) << "CUDA memory is aligned at 256 bytes, not " << alignment;
    }
    Bind(dev.device_id);
    CUdeviceptr pointer = 0;
    CUresult result = g_driver->cuMemAlloc(&pointer, nbytes == 0 ? 1 : nbytes);
    if (result != kSuccess) {
      size_t free = 0, total = 0;
      g_driver->cuMemGetInfo(&free, &total);
      TVM_FFI_THROW(CUDAError) << "cuMemAlloc of " << nbytes << " bytes failed: " << ErrorName(result) << " ("
                               << (free >> 20) << " MiB of " << (total >> 20) << " MiB free on the GPU)";
    }
    return reinterpret_cast<void*>(pointer);
  }

  void FreeDataSpace(DLDevice dev, void* pointer) final { FreeDeviceMemory(dev.device_id, pointer); }

  void* AllocWorkspace(DLDevice dev, size_t nbytes, DLDataType type_hint) final {
    if (void* kept = t_workspaces.Take(dev.device_id, nbytes)) return kept;
    void* pointer = AllocDataSpace(dev, nbytes, tvm::runtime::kTempAllocaAlignment, type_hint);
    t_workspaces.Lent(pointer, nbytes);
    return pointer;
  }

  void FreeWorkspace(DLDevice dev, void* pointer) final {
    if (!t_workspaces.Keep(dev.device_id, pointer)) FreeDataSpace(dev, pointer);
  }

  TVMStreamHandle CreateStream(DLDevice dev) final {
    Bind(dev.device_id);
    CUstream stream = nullptr;
    Check(g_driver->cuStreamCreate(&stream, 1 /* CU_STREAM_NON_BLOCKING */), "cuStreamCreate");
    return stream;
  }

  void FreeStream(DLDevice dev, TVMStreamHandle stream) final {
    Bind(dev.device_id);
    Check(g_driver->cuStreamDestroy(static_cast<CUstream>(stream)), "cuStreamDestroy");
  }

  void StreamSync(DLDevice dev, TVMStreamHandle stream) final {
    Bind(dev.device_id);
    Check(g_driver->cuStreamSynchronize(static_cast<CUstream>(stream)), "a CUDA kernel or copy (cuStreamSynchronize)");
  }

  bool SupportsDevicePointerArithmeticsOnHost() final { return true; }

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset, size_t size,
                      DLDevice dev_from, DLDevice dev_to, DLDataType, TVMStreamHandle stream) final {
    const char* source = static_cast<const char*>(from) + from_offset;
    char* target = static_cast<char*>(to) + to_offset;
    CUstream cu_stream = static_cast<CUstream>(stream);
    const bool from_gpu = dev_from.device_type == kDLCUDA, to_gpu = dev_to.device_type == kDLCUDA;
    if (!from_gpu && !to_gpu) {
      std::memcpy(target, source, size);
    } else if (from_gpu && to_gpu) {
      if (dev_from.device_id != dev_to.device_id) {
        TVM_FFI_THROW(CUDAError) << "copies between two GPUs are not supported by moec-runner";
      }
      Bind(dev_from.device_id);
      Check(g_driver->cuMemcpyDtoDAsync(reinterpret_cast<CUdeviceptr>(target), reinterpret_cast<CUdeviceptr>(source),
                                        size, cu_stream),
            "cuMemcpyDtoDAsync");
    } else if (from_gpu) {  // pageable host memory: returns once the copy is complete
      Bind(dev_from.device_id);
      Check(g_driver->cuMemcpyDtoHAsync(target, reinterpret_cast<CUdeviceptr>(source), size, cu_stream),
            "cuMemcpyDtoHAsync");
    } else {
      Bind(dev_to.device_id);
      Check(g_driver->cuMemcpyHtoDAsync(reinterpret_cast<CUdeviceptr>(target), source, size, cu_stream),
            "cuMemcpyHtoDAsync");
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Kernel timing (SetKernelTiming): a start and an end event per launch, resolved in KernelTimes.

// A launch's grid and block extents (x, y, z each).
using LaunchDims = std::array<unsigned, 6>;

// "grid 96x1x1, block 32x8x1".
std::string LaunchShape(const LaunchDims& dims) {
  return "grid " + std::to_string(dims[0]) + "x" + std::to_string(dims[1]) + "x" + std::to_string(dims[2]) +
         ", block " + std::to_string(dims[3]) + "x" + std::to_string(dims[4]) + "x" + std::to_string(dims[5]);
}

struct KernelTimer {
  std::mutex mutex;
  bool on = false;
  std::vector<CUevent> free_events;                            // recorded and read: reusable
  struct Pending {
    std::string kernel;
    LaunchDims dims;                                           // formatted when read, not per launch
    std::array<CUevent, 2> events;
  };
  std::vector<Pending> pending;                                // launches not yet read
  std::vector<KernelTime> totals;                              // by first launch

  CUevent Event() {
    if (!free_events.empty()) {
      CUevent event = free_events.back();
      free_events.pop_back();
      return event;
    }
    CUevent event = nullptr;
    Check(g_driver->cuEventCreate(&event, 0 /* CU_EVENT_DEFAULT: timed */), "cuEventCreate");
    return event;
  }
};

KernelTimer& Timer() {
  static auto* timer = new KernelTimer();
  return *timer;
}

// ---------------------------------------------------------------------------------------------
// The CUDA module a model library embeds: its serialised bytes, parsed; kernels launched by name.

// Reads TVM's little-endian serialisation, refusing anything that runs past the end.
class ByteReader {
 public:
  explicit ByteReader(const ffi::Bytes& bytes) : data_(bytes.data()), size_(bytes.size()) {}

  template <typename T>
  T Scalar() {
    T value;
    Take(&value, sizeof(T));
    return value;
  }

  std::string Text() {
    const uint64_t length = Scalar<uint64_t>();
    if (length > size_ - offset_) Fail();
    std::string text(data_ + offset_, static_cast<size_t>(length));
    offset_ += static_cast<size_t>(length);
    return text;
  }

  uint64_t Count(size_t min_item_bytes) {  // an array's length, bounded by the bytes left
    const uint64_t count = Scalar<uint64_t>();
    if (count > (size_ - offset_) / min_item_bytes) Fail();
    return count;
  }

  bool AtEnd() const { return offset_ == size_; }

 private:
  void Take(void* out, size_t bytes) {
    if (bytes > size_ - offset_) Fail();
    std::memcpy(out, data_ + offset_, bytes);
    offset_ += bytes;
  }
  [[noreturn]] void Fail() const {
    TVM_FFI_THROW(RuntimeError) << "the model library's CUDA module is truncated or damaged at byte " << offset_
                                << "; recompile the model";
  }

  const char* data_;
  size_t size_;
  size_t offset_ = 0;
};

// How one kernel argument goes from TVM's packed call to cuLaunchKernel (pack_args.h's codes).
enum class ArgKind { kPointerSized, kInt32, kUInt32, kFloat32 };

struct Kernel {
  std::string name;
  std::vector<ArgKind> args;
  std::vector<int> extent_slots;  // per launch tag: 0-2 gridDim.xyz, 3-5 blockDim.xyz
  bool dynamic_shared_memory = false;
};

ArgKind KindOf(DLDataType type, const std::string& kernel) {
  if (type.lanes == 1) {
    if (type.code == kDLOpaqueHandle || (type.bits == 64 && (type.code == kDLInt || type.code == kDLFloat))) {
      return ArgKind::kPointerSized;
    }
    if (type.code == kDLInt && type.bits == 32) return ArgKind::kInt32;
    if (type.code == kDLUInt && type.bits == 32) return ArgKind::kUInt32;
    if (type.code == kDLFloat && type.bits == 32) return ArgKind::kFloat32;
  }
  TVM_FFI_THROW(RuntimeError) << "CUDA kernel " << kernel << " takes an argument of type code " << int(type.code)
                              << " bits " << int(type.bits) << " lanes " << type.lanes
                              << ", which moec-runner cannot pass; recompile the model";
}

Kernel ReadKernel(ByteReader& reader) {
  Kernel kernel;
  kernel.name = reader.Text();
  const uint64_t arg_count = reader.Count(4);
  for (uint64_t i = 0; i < arg_count; ++i) {
    DLDataType type;
    type.code = reader.Scalar<uint8_t>();
    type.bits = reader.Scalar<uint8_t>();
    type.lanes = reader.Scalar<uint16_t>();
    kernel.args.push_back(KindOf(type, kernel.name));
  }
  const uint64_t tag_count = reader.Count(8);
  for (uint64_t i = 0; i < tag_count; ++i) {
    const std::string tag = reader.Text();
    const bool thread = tag.rfind("threadIdx.", 0) == 0, block = tag.rfind("blockIdx.", 0) == 0;
    const char axis = tag.empty() ? '\0' : tag.back();
    if ((thread || block) && axis >= 'x' && axis <= 'z' && tag.size() == (thread ? 11u : 10u)) {
      kernel.extent_slots.push_back((thread ? 3 : 0) + (axis - 'x'));
    } else if (tag == "tirx.use_dyn_shared_memory" && i + 1 == tag_count) {
      kernel.dynamic_shared_memory = true;
    } else {
      TVM_FFI_THROW(RuntimeError) << "CUDA kernel " << kernel.name << " needs launch feature '" << tag
                                  << "', which moec-runner does not launch; recompile the model with moec";
    }
  }
  const uint64_t extra_count = reader.Count(4);
  for (uint64_t i = 0; i < extra_count; ++i) {
    if (reader.Scalar<int32_t>() != 0) {  // ArgExtraTags::kTensorMap
      TVM_FFI_THROW(RuntimeError) << "CUDA kernel " << kernel.name
                                  << " takes a TMA tensor map, which moec-runner does not pass";
    }
  }
  return kernel;
}

class DriverCudaModule final : public ffi::ModuleObj {
 public:
  DriverCudaModule(std::string image, std::vector<Kernel> kernels)
      : image_(std::move(image)), kernels_(std::move(kernels)) {}

  const char* kind() const final { return "cuda"; }
  int GetPropertyMask() const final { return ffi::Module::kRunnable; }

  ffi::Optional<ffi::Function> GetFunction(const ffi::String& name) final {
    for (size_t index = 0; index < kernels_.size(); ++index) {
      if (kernels_[index].name == std::string(name)) {
        ffi::ObjectPtr<ffi::Object> self = ffi::GetObjectPtr<ffi::Object>(this);  // keeps the module alive
        return ffi::Function::FromPacked([this, self, index](ffi::PackedArgs args, ffi::Any*) {
          Launch(kernels_[index], index, args);
        });
      }
    }
    return std::nullopt;
  }

 private:
  // The kernel's CUfunction on device `device_id`, loading the image there on first use.
  CUfunction Function(const Kernel& kernel, size_t index, int device_id, size_t shared_memory) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (modules_.size() <= static_cast<size_t>(device_id)) modules_.resize(device_id + 1);
    Loaded& loaded = modules_[device_id];
    if (loaded.module == nullptr) {
      CUresult result = g_driver->cuModuleLoadData(&loaded.module, image_.data());
      if (result != kSuccess) {
        TVM_FFI_THROW(CUDAError) << "the model's CUDA kernels do not load on this GPU (" << DeviceName(device_id)
                                 << ", " << ComputeArch(device_id) << "): cuModuleLoadData failed: "
                                 << ErrorName(result)
                                 << (result == kErrorNoBinaryForGpu
                                         ? "; they were built for another GPU architecture: recompile for this one"
                                         : "; recompile the model, or update the NVIDIA driver");
      }
      loaded.functions.assign(kernels_.size(), nullptr);
    }
    CUfunction& function = loaded.functions[index];
    if (function == nullptr) {
      Check(g_driver->cuModuleGetFunction(&function, loaded.module, kernel.name.c_str()),
            "cuModuleGetFunction(" + kernel.name + ")");
      // Above 48 KiB of dynamic shared memory a kernel must opt in (TVM: once, on first use).
      if (shared_memory >= kDefaultSharedMemoryLimit) {
        Check(g_driver->cuFuncSetAttribute(function, kFuncAttrMaxDynamicSharedSizeBytes,
                                           static_cast<int>(shared_memory)),
              "cuFuncSetAttribute(" + kernel.name + ", dynamic shared memory)");
      }
    }
    return function;
  }

  void Launch(const Kernel& kernel, size_t index, ffi::PackedArgs args) {
    const size_t arg_count = kernel.args.size(), tag_count = kernel.extent_slots.size();
    const size_t expected = arg_count + tag_count + (kernel.dynamic_shared_memory ? 1 : 0);
    if (static_cast<size_t>(args.size()) != expected) {
      TVM_FFI_THROW(RuntimeError) << "CUDA kernel " << kernel.name << " called with " << args.size()
                                  << " arguments, expected " << expected << "; recompile the model";
    }
    const TVMFFIAny* raw = reinterpret_cast<const TVMFFIAny*>(args.data());
    // Arguments: 64-bit values in place, 32-bit ones converted into `narrow` (pack_args.h). The
    // buffers are this thread's, reused by every launch: no allocation on the launch path.
    thread_local std::vector<void*> addresses;
    thread_local std::vector<uint32_t> narrow;
    addresses.resize(arg_count);
    narrow.resize(arg_count);
    for (size_t i = 0; i < arg_count; ++i) {
      switch (kernel.args[i]) {
        case ArgKind::kPointerSized:
          addresses[i] = const_cast<int64_t*>(&raw[i].v_int64);
          continue;
        case ArgKind::kInt32: {
          const int32_t value = static_cast<int32_t>(raw[i].v_int64);
          std::memcpy(&narrow[i], &value, 4);
          break;
        }
        case ArgKind::kUInt32:
          narrow[i] = static_cast<uint32_t>(raw[i].v_int64);
          break;
        case ArgKind::kFloat32: {
          const float value = static_cast<float>(raw[i].v_float64);
          std::memcpy(&narrow[i], &value, 4);
          break;
        }
      }
      addresses[i] = &narrow[i];
    }
    // Launch shape: extents not tagged are 1, and so are zero extents (a dynamic size of 0:
    // the kernel's own bounds checks then do nothing), as TVM's LaunchParamConfig does.
    LaunchDims dims = {1, 1, 1, 1, 1, 1};
    for (size_t j = 0; j < tag_count; ++j) {
      const int64_t extent = raw[arg_count + j].v_int64;
      if (extent > static_cast<int64_t>(UINT_MAX)) {
        TVM_FFI_THROW(CUDAError) << "CUDA kernel " << kernel.name << ": launch extent " << extent << " is too large";
      }
      if (extent > 0) dims[kernel.extent_slots[j]] = static_cast<unsigned>(extent);
    }
    const size_t shared_memory =
        kernel.dynamic_shared_memory ? static_cast<size_t>(raw[arg_count + tag_count].v_int64) : 0;
    const int device_id = t_current_device;
    Bind(device_id);
    CUfunction function = Function(kernel, index, device_id, shared_memory);
    CUstream stream = static_cast<CUstream>(TVMFFIEnvGetStream(kDLCUDA, device_id));
    KernelTimer& timer = Timer();
    std::array<CUevent, 2> events = {nullptr, nullptr};
    if (timer.on) {
      std::lock_guard<std::mutex> lock(timer.mutex);
      events = {timer.Event(), timer.Event()};
      Check(g_driver->cuEventRecord(events[0], stream), "cuEventRecord");
    }
    CUresult result = g_driver->cuLaunchKernel(function, dims[0], dims[1], dims[2], dims[3], dims[4], dims[5],
                                               static_cast<unsigned>(shared_memory), stream, addresses.data(),
                                               nullptr);
    if (events[0] != nullptr) {
      std::lock_guard<std::mutex> lock(timer.mutex);
      Check(g_driver->cuEventRecord(events[1], stream), "cuEventRecord");
      timer.pending.push_back({kernel.name, dims, events});
    }
    if (result != kSuccess && result != kErrorDeinitialized) {
      TVM_FFI_THROW(CUDAError) << "CUDA kernel " << kernel.name << " did not launch (" << LaunchShape(dims) << ", "
                               << shared_memory << " bytes of shared memory): " << ErrorName(result);
    }
  }

  struct Loaded {
    CUmodule module = nullptr;
    std::vector<CUfunction> functions;  // by kernel index, looked up on first launch
  };

  std::string image_;  // the cubin (or PTX, fatbin) handed to cuModuleLoadData
  std::vector<Kernel> kernels_;
  std::vector<Loaded> modules_;  // by device id
  std::mutex mutex_;
};

ffi::Module LoadCudaModule(const ffi::Bytes& bytes) {
  ByteReader reader(bytes);
  const std::string format = reader.Text();
  if (format != "cubin" && format != "fatbin" && format != "ptx") {
    TVM_FFI_THROW(RuntimeError) << "the model library embeds CUDA kernels as '" << format
                                << "' instead of a cubin; recompile the model with moec";
  }
  std::vector<Kernel> kernels(reader.Count(8 + 8 + 8 + 8 + 8));
  for (Kernel& kernel : kernels) {
    reader.Text();  // the map's key: the kernel's name, repeated in its FunctionInfo
    kernel = ReadKernel(reader);
  }
  std::string image = reader.Text();
  if (!reader.AtEnd()) {
    TVM_FFI_THROW(RuntimeError) << "the model library's CUDA module has trailing bytes; recompile the model";
  }
  if (format == "ptx") image.push_back('\0');  // cuModuleLoadData reads PTX as a C string
  return ffi::Module(ffi::make_object<DriverCudaModule>(std::move(image), std::move(kernels)));
}

}  // namespace

void SetKernelTiming(bool on) {
  std::lock_guard<std::mutex> lock(Timer().mutex);
  Timer().on = on;
}

std::vector<KernelTime> KernelTimes() {
  KernelTimer& timer = Timer();
  std::lock_guard<std::mutex> lock(timer.mutex);
  for (auto& [name, dims, events] : timer.pending) {
    Check(g_driver->cuEventSynchronize(events[1]), "cuEventSynchronize");
    float milliseconds = 0;
    Check(g_driver->cuEventElapsedTime(&milliseconds, events[0], events[1]), "cuEventElapsedTime");
    auto found = std::find_if(timer.totals.begin(), timer.totals.end(),
                              [&](const KernelTime& t) { return t.kernel == name; });
    if (found == timer.totals.end()) found = timer.totals.insert(timer.totals.end(), KernelTime{name, 0, 0, {}});
    found->launches += 1;
    found->shape = LaunchShape(dims);
    found->milliseconds += milliseconds;
    timer.free_events.insert(timer.free_events.end(), events.begin(), events.end());
  }
  timer.pending.clear();
  std::vector<KernelTime> sorted = timer.totals;
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const KernelTime& a, const KernelTime& b) { return a.milliseconds > b.milliseconds; });
  return sorted;
}

std::string InstallCudaDriverRuntime(int device_id) {
  static std::once_flag opened;
  std::call_once(opened, [] { g_driver = OpenDriver(); });
  CUresult result = g_driver->cuInit(0);
  int count = 0;
  if (result == kSuccess) result = g_driver->cuDeviceGetCount(&count);
  if (result == kErrorNoDevice || (result == kSuccess && count == 0)) {
    throw std::runtime_error("no CUDA device: the NVIDIA driver (libcuda.so.1) reports none (" +
                             (result == kSuccess ? std::string("0 devices") : ErrorName(result)) +
                             "); this artifact needs the board's GPU");
  }
  if (result != kSuccess) {
    throw std::runtime_error("the NVIDIA driver (libcuda.so.1) does not start: cuInit failed with " +
                             ErrorName(result) + "; check the driver installation (nvidia-smi, or tegrastats)");
  }
  if (device_id >= count) {
    throw std::runtime_error("no CUDA device " + std::to_string(device_id) + ": the NVIDIA driver reports " +
                             std::to_string(count));
  }
  AllDevices().count = std::min(count, kMaxDevices);
  static auto* api = new DriverDeviceAPI();  // never destroyed: TVM keeps the pointer
  ffi::Function::SetGlobal(
      "device_api.cuda", ffi::Function::FromTyped([]() -> void* { return static_cast<void*>(api); }), true);
  ffi::Function::SetGlobal("ffi.Module.load_from_bytes.cuda", ffi::Function::FromTyped(LoadCudaModule), true);
  int version = 0;
  g_driver->cuDriverGetVersion(&version);
  return DeviceName(device_id) + ", " + ComputeArch(device_id) + ", driver " + std::to_string(version / 1000) +
         "." + std::to_string(version % 1000 / 10);
}

}  // namespace moec
