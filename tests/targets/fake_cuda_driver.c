/* A stand-in NVIDIA driver (libcuda.so.1) for testing moec's CUDA paths on a machine without a GPU.
 *
 * It reports one GPU, an H200 (compute capability 9.0, 132 SMs, 50 MiB L2), so that
 * `moec compile --target cuda` detects sm_90 (MOEC_FAKE_CUDA_ARCH=87 makes it an Orin's GPU,
 * compute capability 8.7), and it implements the driver API entry points
 * moec-runner's CUDA runtime uses (moec/runtime/native/cuda_driver.cc) on host memory: device
 * memory is calloc'ed, copies are memcpy. Kernels do not run (nothing here executes a cubin),
 * but every launch is checked the way the GPU would see it:
 *   - the module is a CUDA ELF image (EM_CUDA) for an architecture the GPU runs (the same major
 *     version, a minor one no newer: else CUDA_ERROR_NO_BINARY_FOR_GPU, as a driver says), and
 *     the function is one of its kernels;
 *   - the kernel's parameters, read from the cubin's own parameter table (.nv.info.<kernel>,
 *     EIATTR_KPARAM_INFO: ordinal, offset, size), are all passed; an 8-byte parameter must hold
 *     either a pointer into live device memory or a small integer (a size), so a missing,
 *     shifted or host pointer is caught;
 *   - the launch shape is non-empty and at most 1024 threads per block;
 *   - copies stay inside live allocations, frees name live allocations.
 * A failed check returns CUDA_ERROR_INVALID_VALUE and says why on stderr. Events read a clock that
 * each launch advances by one microsecond per thread block, so timed kernels have a known time. Each launch appends
 * "NAME grid=X,Y,Z block=X,Y,Z params=N pointers=P" to $MOEC_FAKE_CUDA_LOG when that is set, and each
 * cuMemAlloc / cuMemFree appends "alloc SIZE" / "free" to $MOEC_FAKE_CUDA_MEMORY_LOG.
 * MOEC_FAKE_CUDA_DEVICES=0 makes it a driver without a device (cuInit: CUDA_ERROR_NO_DEVICE).
 * It is built for the machine (cc) and for aarch64 (aarch64-linux-gnu-gcc, run under qemu).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
enum {
  OK = 0,
  INVALID_VALUE = 1,
  NOT_INITIALIZED = 3,
  NO_DEVICE = 100,
  INVALID_IMAGE = 200,
  NO_BINARY_FOR_GPU = 209,
  NOT_FOUND = 500
};

static int initialised;

static int device_count(void) {
  const char *count = getenv("MOEC_FAKE_CUDA_DEVICES");
  return count ? atoi(count) : 1;
}

static int compute_capability(void) { /* 10 * major + minor */
  const char *arch = getenv("MOEC_FAKE_CUDA_ARCH");
  return arch ? atoi(arch) : 90;
}

static CUresult complain(const char *what, const char *name) {
  fprintf(stderr, "fake libcuda: %s%s%s\n", what, name ? ": " : "", name ? name : "");
  return INVALID_VALUE;
}

/* --- devices ---------------------------------------------------------------------------- */

CUresult cuInit(unsigned flags) {
  (void)flags;
  if (device_count() == 0) return NO_DEVICE;
  initialised = 1;
  return OK;
}
CUresult cuDriverGetVersion(int *version) { *version = 12060; return OK; }
CUresult cuDeviceGetCount(int *count) {
  if (!initialised) return NOT_INITIALIZED;
  *count = device_count();
  return OK;
}
CUresult cuDeviceGet(int *device, int ordinal) {
  if (!initialised) return NOT_INITIALIZED;
  *device = ordinal;
  return ordinal >= 0 && ordinal < device_count() ? OK : 101;
}
CUresult cuDeviceGetName(char *name, int length, int device) {
  (void)device;
  snprintf(name, (size_t)length, "%s", compute_capability() == 87 ? "Fake Orin" : "Fake H200");
  return OK;
}
CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
  (void)device;
  switch (attribute) {
    case 1: *value = 1024; return OK;      /* max threads per block */
    case 2: *value = 1024; return OK;      /* max block dim x */
    case 3: *value = 1024; return OK;      /* y */
    case 4: *value = 64; return OK;        /* z */
    case 8: *value = 49152; return OK;     /* shared memory per block */
    case 10: *value = 32; return OK;       /* warp size */
    case 12: *value = 65536; return OK;    /* registers per block */
    case 13: *value = 1980000; return OK;  /* clock, kHz */
    case 16: *value = 132; return OK;      /* multiprocessors */
    case 36: *value = 2619000; return OK;  /* memory clock, kHz */
    case 37: *value = 6144; return OK;     /* memory bus, bits */
    case 38: *value = 52428800; return OK; /* L2 */
    case 75: *value = compute_capability() / 10; return OK; /* compute capability */
    case 76: *value = compute_capability() % 10; return OK;
  }
  return INVALID_VALUE;
}
CUresult cuDeviceTotalMem_v2(size_t *bytes, int device) { (void)device; *bytes = (size_t)141 << 30; return OK; }

static int context_token;
CUresult cuDevicePrimaryCtxRetain(void **context, int device) {
  if (!initialised || device < 0 || device >= device_count()) return NOT_INITIALIZED;
  *context = &context_token;
  return OK;
}
static void *current_context;
CUresult cuCtxGetCurrent(void **context) { *context = current_context; return OK; }
CUresult cuCtxSetCurrent(void *context) { current_context = context; return OK; }

/* --- memory ----------------------------------------------------------------------------- */

struct allocation { char *base; size_t size; };
static struct allocation *allocations;
static size_t allocation_count, allocation_capacity;

static long find(uintptr_t address, size_t size) { /* the allocation holding [address, +size) */
  for (size_t i = 0; i < allocation_count; ++i) {
    uintptr_t base = (uintptr_t)allocations[i].base;
    if (address >= base && address - base <= allocations[i].size && size <= allocations[i].size - (address - base))
      return (long)i;
  }
  return -1;
}

static void log_memory(const char *what, size_t size) {
  const char *log = getenv("MOEC_FAKE_CUDA_MEMORY_LOG");
  FILE *out = log ? fopen(log, "a") : NULL;
  if (out == NULL) return;
  if (size) fprintf(out, "%s %zu\n", what, size); else fprintf(out, "%s\n", what);
  fclose(out);
}

CUresult cuMemAlloc_v2(uintptr_t *pointer, size_t size) {
  if (current_context == NULL) return complain("cuMemAlloc without a current context", NULL);
  if (allocation_count == allocation_capacity) {
    allocation_capacity = allocation_capacity ? 2 * allocation_capacity : 64;
    allocations = realloc(allocations, allocation_capacity * sizeof *allocations);
  }
  char *base = calloc(1, size ? size : 1);
  if (base == NULL) return 2; /* CUDA_ERROR_OUT_OF_MEMORY */
  allocations[allocation_count].base = base;
  allocations[allocation_count++].size = size;
  *pointer = (uintptr_t)base;
  log_memory("alloc", size ? size : 1);
  return OK;
}
CUresult cuMemFree_v2(uintptr_t pointer) {
  for (size_t i = 0; i < allocation_count; ++i) {
    if ((uintptr_t)allocations[i].base == pointer) {
      free(allocations[i].base);
      allocations[i] = allocations[--allocation_count];
      log_memory("free", 0);
      return OK;
    }
  }
  return complain("cuMemFree of memory it did not allocate", NULL);
}
CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) { *free_bytes = *total = (size_t)141 << 30; return OK; }
CUresult cuMemcpyHtoDAsync_v2(uintptr_t to, const void *from, size_t size, void *stream) {
  (void)stream;
  if (find(to, size) < 0) return complain("cuMemcpyHtoD outside device memory", NULL);
  memcpy((void *)to, from, size);
  return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void *to, uintptr_t from, size_t size, void *stream) {
  (void)stream;
  if (find(from, size) < 0) return complain("cuMemcpyDtoH outside device memory", NULL);
  memcpy(to, (const void *)from, size);
  return OK;
}
CUresult cuMemcpyDtoDAsync_v2(uintptr_t to, uintptr_t from, size_t size, void *stream) {
  (void)stream;
  if (find(to, size) < 0 || find(from, size) < 0) return complain("cuMemcpyDtoD outside device memory", NULL);
  memmove((void *)to, (const void *)from, size);
  return OK;
}

static int stream_token;
CUresult cuStreamCreate(void **stream, unsigned flags) { (void)flags; *stream = &stream_token; return OK; }
CUresult cuStreamDestroy_v2(void *stream) { (void)stream; return OK; }
CUresult cuStreamSynchronize(void *stream) { (void)stream; return OK; }

/* --- modules and kernels ---------------------------------------------------------------- */

struct function { char name[256]; int params; size_t sizes[64]; };
static unsigned long long clock_us; /* the fake GPU's clock: each launch advances it */
struct module { const unsigned char *image; };

static uint16_t u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint32_t u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t u64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

CUresult cuModuleLoadData(struct module **module, const void *image) {
  const unsigned char *elf = image;
  if (current_context == NULL) return complain("cuModuleLoadData without a current context", NULL);
  if (memcmp(elf, "\177ELF", 4) != 0 || elf[4] != 2 || u16(elf + 18) != 190) return INVALID_IMAGE;
  /* e_flags holds the sm_XY the cubin is for (bits 8-15 from ELF ABI version 8, CUDA 13; 0-7 before) */
  unsigned sm = elf[8] >= 8 ? (u32(elf + 48) >> 8) & 0xff : u32(elf + 48) & 0xff;
  if (sm / 10 != (unsigned)compute_capability() / 10 || sm % 10 > (unsigned)compute_capability() % 10)
    return NO_BINARY_FOR_GPU;
  *module = malloc(sizeof **module);
  (*module)->image = elf; /* the caller keeps the image alive while the module is loaded */
  return OK;
}
CUresult cuModuleUnload(struct module *module) { free(module); return OK; }

/* The kernel's parameters from section ".nv.info.<name>" (EIATTR_KPARAM_INFO records). */
CUresult cuModuleGetFunction(struct function **function, struct module *module, const char *name) {
  const unsigned char *elf = module->image;
  uint64_t section_offset = u64(elf + 40);
  unsigned entry = u16(elf + 58), count = u16(elf + 60), names = u16(elf + 62);
  const unsigned char *table = elf + u64(elf + section_offset + (uint64_t)names * entry + 24);
  char wanted[300];
  snprintf(wanted, sizeof wanted, ".nv.info.%s", name);
  for (unsigned i = 0; i < count; ++i) {
    const unsigned char *header = elf + section_offset + (uint64_t)i * entry;
    if (strcmp((const char *)table + u32(header), wanted) != 0) continue;
    const unsigned char *info = elf + u64(header + 24), *end = info + u64(header + 32);
    struct function *found = calloc(1, sizeof *found);
    snprintf(found->name, sizeof found->name, "%s", name);
    while (info + 4 <= end) { /* records: format, attribute, then a value or a sized payload */
      unsigned format = info[0], attribute = info[1];
      if (format == 4) { /* EIFMT_SVAL: u16 size, payload */
        unsigned size = u16(info + 2);
        if (attribute == 0x17) { /* KPARAM_INFO: u32 index, u16 ordinal, u16 offset, u32 (size << 18) */
          unsigned ordinal = u16(info + 8);
          if (ordinal < 64) {
            found->sizes[ordinal] = u32(info + 12) >> 18;
            if ((int)ordinal + 1 > found->params) found->params = (int)ordinal + 1;
          }
        }
        info += 4 + size;
      } else { /* EIFMT_NVAL, EIFMT_BVAL, EIFMT_HVAL: four bytes in all */
        info += 4;
      }
    }
    *function = found;
    return OK;
  }
  return complain("no such kernel in the module", name);
}
CUresult cuFuncSetAttribute(struct function *function, int attribute, int value) {
  (void)function, (void)attribute, (void)value;
  return OK;
}

CUresult cuLaunchKernel(struct function *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, void *stream, void **params, void **extra) {
  (void)stream, (void)shared;
  if (extra != NULL) return complain("launch with 'extra' parameters", f->name);
  if (!gx || !gy || !gz || !bx || !by || !bz || (uint64_t)bx * by * bz > 1024)
    return complain("launch shape out of range", f->name);
  int pointers = 0;
  for (int i = 0; i < f->params; ++i) {
    if (params[i] == NULL) return complain("a parameter is missing", f->name);
    if (f->sizes[i] != 8) continue;
    uint64_t value = u64(params[i]);
    if (find((uintptr_t)value, 0) >= 0) {
      ++pointers;
    } else if (value + (1ull << 31) >= (1ull << 32)) { /* neither device memory nor a small integer */
      char why[400];
      snprintf(why, sizeof why, "%s parameter %d is 0x%llx, not device memory", f->name, i, (unsigned long long)value);
      return complain(why, NULL);
    }
  }
  clock_us += (unsigned long long)gx * gy * gz;
  const char *log = getenv("MOEC_FAKE_CUDA_LOG");
  if (log) {
    FILE *out = fopen(log, "a");
    if (out) {
      fprintf(out, "%s grid=%u,%u,%u block=%u,%u,%u params=%d pointers=%d\n", f->name, gx, gy, gz, bx, by, bz,
              f->params, pointers);
      fclose(out);
    }
  }
  return OK;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
  switch (error) {
    case OK: *name = "CUDA_SUCCESS"; break;
    case INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
    case NOT_INITIALIZED: *name = "CUDA_ERROR_NOT_INITIALIZED"; break;
    case NO_DEVICE: *name = "CUDA_ERROR_NO_DEVICE"; break;
    case INVALID_IMAGE: *name = "CUDA_ERROR_INVALID_IMAGE"; break;
    case NO_BINARY_FOR_GPU: *name = "CUDA_ERROR_NO_BINARY_FOR_GPU"; break;
    case NOT_FOUND: *name = "CUDA_ERROR_NOT_FOUND"; break;
    default: *name = "CUDA_ERROR_UNKNOWN"; return INVALID_VALUE;
  }
  return OK;
}
CUresult cuGetErrorString(CUresult error, const char **text) { return cuGetErrorName(error, text); }

/* Events: recorded in order; each launch's "GPU time" is 1 microsecond per thread block. */
struct event { unsigned long long at; };
CUresult cuEventCreate(struct event **event, unsigned flags) { (void)flags; *event = calloc(1, sizeof **event); return OK; }
CUresult cuEventRecord(struct event *event, void *stream) { (void)stream; event->at = clock_us; return OK; }
CUresult cuEventSynchronize(struct event *event) { (void)event; return OK; }
CUresult cuEventElapsedTime(float *ms, struct event *start, struct event *end) {
  *ms = (float)(end->at - start->at) / 1000.0f;
  return OK;
}

/* What TVM's own CUDA runtime library links besides (loaded at compile time only): no device. */
CUresult cuFuncGetAttribute(void) { return NO_DEVICE; }
CUresult cuLaunchKernelEx(void) { return NO_DEVICE; }
CUresult cuModuleGetGlobal(void) { return NO_DEVICE; }
CUresult cuTensorMapEncodeTiled(void) { return NO_DEVICE; }
