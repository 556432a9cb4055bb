// TVM's CUDA device and CUDA modules on the NVIDIA driver API alone (see cuda_driver.cc).
#ifndef MOEC_RUNTIME_NATIVE_CUDA_DRIVER_H_
#define MOEC_RUNTIME_NATIVE_CUDA_DRIVER_H_

#include <string>
#include <vector>

namespace moec {

// Loads the NVIDIA driver library (libcuda.so.1) with dlopen, checks that it has a device
// `device_id`, and registers with TVM's runtime the CUDA device API ("device_api.cuda") and the
// loader of the CUDA modules a model library embeds ("ffi.Module.load_from_bytes.cuda"), both
// written on the driver API. Call it before loading the model library. Returns the device, in
// words ("NVIDIA H200, sm_90, driver 13.0"). Throws std::runtime_error with a one-line message
// when the driver is missing or has no such device.
std::string InstallCudaDriverRuntime(int device_id);

// Per-kernel GPU time: while on, each launch is bracketed by two CUDA events on its stream (which
// serialises nothing, but adds two event records per launch). Off by default.
void SetKernelTiming(bool on);

// One kernel's share of the timed calls: its launches, their summed GPU time (milliseconds) and
// the launch shape of the last one ("grid 96x1x1, block 32x8x1").
struct KernelTime {
  std::string kernel;
  long launches = 0;
  double milliseconds = 0;
  std::string shape;
};

// The GPU time of every kernel launched since kernel timing was turned on, most time first. Waits
// for the recorded events (call it after synchronising the device).
std::vector<KernelTime> KernelTimes();

}  // namespace moec

#endif  // MOEC_RUNTIME_NATIVE_CUDA_DRIVER_H_
