// moec-runner: run a moec artifact with TVM's runtime alone (no Python, no compiler).
//
// This is the program a user deploys on a board next to the artifact directory. It links only
// libtvm_runtime.so and libtvm_ffi.so:
//
//   moec-runner ARTIFACT_DIR [--input NAME=path.npy ...] [--random-inputs [--tokens T] [--seed S]]
//               [--output-dir DIR] [--repeat N] [--warmup W] [--threads T] [--skip-hash-check]
//               [--kernel-times]
//
// It reads manifest.json (input, output and weight names, and whether the target is a CUDA
// GPU), checks the library and weights.bin against the manifest's "files" (each one's size and
// SHA-256, so that a truncated, changed or half-copied file is refused before anything is loaded;
// hashing reads every byte once, which --skip-hash-check spares: sizes are always checked), maps
// weights.bin (moec/weights_file.py's layout: a header, a JSON index, 64-byte aligned tensors)
// privately and read-only, advised MADV_HUGEPAGE, and makes each weight a tensor over the
// mapping (nothing is copied on the CPU), loads the model library, creates the Relax VM
// ("vm_load_executable", "vm_initialization"), runs main(*inputs, *params) once (or the
// manifest's "entries"."one_token" function when every symbolic input dimension is 1), prints each
// output's shape and, with --output-dir, writes it as DIR/<output name>.npy ('/' in a name
// becomes '_'). --random-inputs makes every input not given with --input from random numbers
// (symbolic dimensions: T tokens, as `moec run --tokens` does; integers over the input's
// manifest "range", token ids over the vocabulary, else 0 or 1), so that the model runs on a
// board without any input files. With --repeat N it then times N further runs (after W
// warmups, inputs already on the device). --threads T sets the CPU threads (TVM_NUM_THREADS).
// --kernel-times (CUDA artifacts, with --repeat N) then makes N more calls with each kernel launch
// timed by CUDA events and prints each kernel's launches and GPU time per call, most time first
// ("kernel NAME: L launches, X ms per call, P% of kernel time (grid XxYxZ, block XxYxZ)", the
// last launch's shape); the latency line is unaffected.
// Last it prints its peak resident memory ("peak RSS N MiB", VmHWM).
//
// Device: CPU for llvm targets. For a CUDA target (manifest "target"."cuda" not null) the
// runner opens the NVIDIA driver (libcuda.so.1, and no other CUDA library: cuda_driver.cc),
// prints the GPU ("device: ..."), creates the VM for the GPU with the CPU as host (for shape
// computations), copies inputs and weights (from the mapping) to the GPU and outputs back, and
// synchronises the GPU after each timed call.
//
// SHA-256 runs on the CPU's SHA-256 instructions where it has them (x86-64 SHA-NI, aarch64 SHA2),
// else on portable C++. A test and debug switch: the environment variable MOEC_RUNNER_SHA256=portable
// forces the portable code, =hardware the instructions (an error on a CPU without them).
// Every failure is one line on stderr ("moec-runner: error: ...") and exit status 1; usage
// errors (the line then ends with the usage) exit with status 2.

#include <dlpack/dlpack.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>  // SHA-NI
#elif defined(__aarch64__)
#include <arm_neon.h>  // ARMv8 SHA2
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda_driver.h"

namespace ffi = tvm::ffi;
namespace fs = std::filesystem;

namespace {

const char* const kUsage =
    "usage: moec-runner ARTIFACT_DIR [--input NAME=path.npy ...] [--random-inputs [--tokens T] "
    "[--seed S]] [--output-dir DIR] [--repeat N] [--warmup W] [--threads T] [--skip-hash-check] "
    "[--kernel-times]";
const char* const kFormat = "moec-artifact/3";
const DLDevice kCPU = {kDLCPU, 0};
const DLDevice kCUDA = {kDLCUDA, 0};

// A user-facing failure: printed as one line, exit status 1.
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A command-line mistake: printed with the usage line, exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Newlines folded away so that every message stays on one line.
std::string OneLine(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

// ---------------------------------------------------------------------------------------------
// dtypes: numpy names (manifest), npy descriptors (files) and DLPack types, one table.

struct DType {
  const char* name;   // numpy name, as in manifest.json
  const char* descr;  // npy descriptor, little-endian
  DLDataType dl;
};

const DType kDTypes[] = {
    {"float32", "<f4", {kDLFloat, 32, 1}}, {"float64", "<f8", {kDLFloat, 64, 1}},
    {"float16", "<f2", {kDLFloat, 16, 1}}, {"int64", "<i8", {kDLInt, 64, 1}},
    {"int32", "<i4", {kDLInt, 32, 1}},     {"int16", "<i2", {kDLInt, 16, 1}},
    {"int8", "|i1", {kDLInt, 8, 1}},       {"uint8", "|u1", {kDLUInt, 8, 1}},
    {"bool", "|b1", {kDLBool, 8, 1}},
};

const DType* DTypeFromDescr(const std::string& descr) {
  for (const DType& t : kDTypes) {
    // numpy writes one-byte types with '|' but accepts '<' and '=' too.
    if (descr == t.descr || (t.descr[0] == '|' && descr.size() == 3 &&
                             (descr[0] == '<' || descr[0] == '=') && descr.substr(1) == t.descr + 1)) {
      return &t;
    }
  }
  return nullptr;
}

const DType* DTypeFromDL(DLDataType dl) {
  for (const DType& t : kDTypes) {
    if (t.dl.code == dl.code && t.dl.bits == dl.bits && t.dl.lanes == dl.lanes) return &t;
  }
  return nullptr;
}

const DType* DTypeFromName(const std::string& name) {
  for (const DType& t : kDTypes) {
    if (name == t.name) return &t;
  }
  return nullptr;
}

size_t ItemSize(const DType& t) { return (t.dl.bits + 7) / 8; }

// The bytes of a `dtype` tensor of `shape`; nullopt when a dimension is negative or the size does
// not fit in int64. Shapes come from files and manifests, so their products must not wrap.
std::optional<int64_t> ByteSize(const std::vector<int64_t>& shape, const DType& dtype) {
  int64_t bytes = static_cast<int64_t>(ItemSize(dtype));
  for (int64_t d : shape) {
    if (d < 0 || (d > 0 && bytes > std::numeric_limits<int64_t>::max() / d)) return std::nullopt;
    bytes *= d;
  }
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// .npy files (format versions 1-3, C order, little-endian).

struct Array {
  const DType* dtype = nullptr;
  std::vector<int64_t> shape;
  std::string data;  // raw bytes, C order
};

std::string ReadFile(const fs::path& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Failure(path.string() + ": cannot read " + what);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// The value after 'key': in a numpy header dict, as raw text up to the next top-level ',' or '}'.
std::string HeaderField(const std::string& header, const std::string& key, const std::string& path) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw Failure(path + ": bad npy header (no '" + key + "')");
  at = header.find(':', at);
  if (at == std::string::npos) throw Failure(path + ": bad npy header (" + key + ")");
  ++at;
  while (at < header.size() && header[at] == ' ') ++at;
  size_t end = at;
  int depth = 0;
  while (end < header.size()) {
    char c = header[end];
    if (c == '(' || c == '[') ++depth;
    if (c == ')' || c == ']') --depth;
    if (depth == 0 && (c == ',' || c == '}')) break;
    ++end;
  }
  if (end == header.size() || depth != 0) throw Failure(path + ": bad npy header (" + key + ")");
  std::string value = header.substr(at, end - at);
  while (!value.empty() && value.back() == ' ') value.pop_back();
  return value;
}

Array LoadNpy(const std::string& path) {
  if (!fs::is_regular_file(path)) throw Failure(path + ": no such .npy file");
  std::string bytes = ReadFile(path, ".npy file");
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) {
    throw Failure(path + ": not a .npy file (bad magic)");
  }
  const auto* u = reinterpret_cast<const unsigned char*>(bytes.data());
  int major = u[6];
  size_t header_len, offset;
  if (major == 1) {
    header_len = u[8] | (u[9] << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) throw Failure(path + ": truncated .npy header");
    header_len = static_cast<size_t>(u[8]) | (static_cast<size_t>(u[9]) << 8) |
                 (static_cast<size_t>(u[10]) << 16) | (static_cast<size_t>(u[11]) << 24);
    offset = 12;
  } else {
    throw Failure(path + ": unsupported .npy format version " + std::to_string(major));
  }
  if (bytes.size() < offset + header_len) throw Failure(path + ": truncated .npy header");
  std::string header = bytes.substr(offset, header_len);

  std::string descr = HeaderField(header, "descr", path);
  const char quote = descr.empty() ? ' ' : descr.front();
  if (descr.size() < 2 || (quote != '\'' && quote != '"') || descr.back() != quote) {
    throw Failure(path + ": unsupported npy dtype " + descr + " (structured arrays are not supported)");
  }
  descr = descr.substr(1, descr.size() - 2);
  Array array;
  array.dtype = DTypeFromDescr(descr);
  if (array.dtype == nullptr) {
    throw Failure(path + ": unsupported npy dtype '" + descr +
                  "' (supported: little-endian float32, float64, float16, int64, int32, int16, int8, "
                  "uint8, bool)");
  }
  if (HeaderField(header, "fortran_order", path) != "False") {
    throw Failure(path + ": Fortran-order .npy is not supported; save with np.ascontiguousarray");
  }
  std::string shape = HeaderField(header, "shape", path);
  if (shape.size() < 2 || shape.front() != '(' || shape.back() != ')') {
    throw Failure(path + ": bad npy header (shape " + shape + ")");
  }
  std::stringstream dims(shape.substr(1, shape.size() - 2));
  std::string item;
  while (std::getline(dims, item, ',')) {
    size_t first = item.find_first_not_of(' ');
    if (first == std::string::npos) continue;  // the trailing comma of "(3,)"
    size_t used = 0;
    long long dim = -1;
    try {
      dim = std::stoll(item.substr(first), &used);
    } catch (const std::exception&) {
      used = 0;
    }
    std::string rest = item.substr(first + used);
    if (used == 0 || dim < 0 || rest.find_first_not_of(" L") != std::string::npos) {
      throw Failure(path + ": bad npy header (shape " + shape + ")");
    }
    array.shape.push_back(dim);
  }
  std::optional<int64_t> expected = ByteSize(array.shape, *array.dtype);
  if (!expected.has_value()) throw Failure(path + ": bad npy header (shape " + shape + " is too large)");
  size_t have = bytes.size() - offset - header_len;
  if (have != static_cast<uint64_t>(*expected)) {
    throw Failure(path + ": .npy data has " + std::to_string(have) + " bytes, its header says " +
                  std::to_string(*expected));
  }
  array.data = bytes.substr(offset + header_len);
  return array;
}

void SaveNpy(const fs::path& path, const DType& dtype, const std::vector<int64_t>& shape,
             const std::string& data) {
  std::string dims;
  for (int64_t d : shape) dims += std::to_string(d) + ", ";
  if (shape.size() > 1) dims.resize(dims.size() - 2);
  if (shape.size() == 1) dims.resize(dims.size() - 1);  // "(3,)"
  std::string header = std::string("{'descr': '") + dtype.descr +
                       "', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;  // magic+version+length, header, newline
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  if (header.size() > 65535) throw Failure(path.string() + ": npy header too long");
  std::ofstream out(path, std::ios::binary);
  if (!out) throw Failure(path.string() + ": cannot write output");
  out.write("\x93NUMPY\x01\x00", 8);
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                static_cast<unsigned char>(header.size() >> 8)};
  out.write(reinterpret_cast<const char*>(len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  if (!out) throw Failure(path.string() + ": cannot write output");
}

// ---------------------------------------------------------------------------------------------
// manifest.json, parsed with tvm-ffi's JSON reader (part of libtvm_ffi, which we link anyway).

// tvm-ffi's JSON reader recurses once per nesting level, so that a file of a million '[' would
// overflow the stack; nesting deeper than any manifest or weights index has is refused first.
const int kMaxJsonDepth = 64;

// `text` parsed as JSON; on failure, why in `error` (else it is left empty).
ffi::Any ParseJson(const std::string& text, std::string* error) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // the escaped character cannot end the string
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if ((c == '[' || c == '{') && ++depth > kMaxJsonDepth) {
      *error = "nested deeper than " + std::to_string(kMaxJsonDepth) + " levels";
      return ffi::Any();
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  ffi::String parse_error;
  ffi::Any value = ffi::json::Parse(ffi::String(text), &parse_error);
  *error = OneLine(std::string(parse_error));
  return value;
}

struct TensorSpec {
  std::string name;
  std::string dtype;                  // numpy name
  std::vector<int64_t> shape;         // -1 for a symbolic dimension
  std::vector<std::string> symbols;   // the symbolic dimension's name, "" for a fixed one
  int64_t low = 0, high = 2;          // an integer input's values: [low, high) ("range"; 0/1)
};

// What the manifest records of one file of the artifact ("files"."<name>").
struct FileRecord {
  int64_t bytes = 0;
  std::string sha256;  // 64 lowercase hex digits
};

struct Manifest {
  std::string library, weights;  // file names in the artifact directory
  std::map<std::string, FileRecord> files;  // the library's and the weights' records, by file name
  std::vector<TensorSpec> inputs, outputs;
  std::vector<std::string> params;
  bool cuda = false;  // the target is a CUDA GPU (manifest "target"."cuda" is an object)
  std::string one_token;  // "entries"."one_token": main with its symbolic input dims fixed to 1
};

ffi::Any Field(const ffi::Map<ffi::Any, ffi::Any>& object, const char* key, const std::string& where) {
  auto found = object.Get(ffi::String(key));
  if (!found.has_value()) throw Failure(where + ": manifest has no '" + key + "'; recompile the model");
  return *found;
}

std::string AsString(const ffi::Any& value, const std::string& where) {
  auto text = value.try_cast<ffi::String>();
  if (!text.has_value()) throw Failure(where + ": expected a string; recompile the model");
  return std::string(*text);
}

ffi::Array<ffi::Any> AsList(const ffi::Any& value, const std::string& where) {
  auto list = value.try_cast<ffi::Array<ffi::Any>>();
  if (!list.has_value()) throw Failure(where + ": expected a list; recompile the model");
  return *list;
}

std::vector<TensorSpec> ParseSpecs(const ffi::Map<ffi::Any, ffi::Any>& root, const char* key,
                                   const std::string& where) {
  std::vector<TensorSpec> specs;
  std::string here = where + " '" + key + "'";
  for (const ffi::Any& entry : AsList(Field(root, key, where), here)) {
    auto object = entry.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
    if (!object.has_value()) throw Failure(here + ": expected objects; recompile the model");
    TensorSpec spec;
    spec.name = AsString(Field(*object, "name", here), here + " name");
    spec.dtype = AsString(Field(*object, "dtype", here), here + " dtype");
    for (const ffi::Any& dim : AsList(Field(*object, "shape", here), here + " shape")) {
      auto fixed = dim.as<int64_t>();  // exact ints only: symbolic dimensions are strings
      auto symbol = dim.try_cast<ffi::String>();
      if (fixed.has_value() ? *fixed < 0 : !symbol.has_value()) {
        throw Failure(here + " shape: expected non-negative integers and names; recompile the model");
      }
      spec.shape.push_back(fixed.has_value() ? *fixed : -1);
      spec.symbols.push_back(fixed.has_value() ? "" : std::string(*symbol));
    }
    if (object->count(ffi::String("range"))) {  // token ids: [0, vocabulary size)
      ffi::Array<ffi::Any> range = AsList(Field(*object, "range", here), here + " range");
      auto low = range.size() == 2 ? range[0].as<int64_t>() : std::nullopt;
      auto high = range.size() == 2 ? range[1].as<int64_t>() : std::nullopt;
      if (!low.has_value() || !high.has_value() || *low >= *high) {
        throw Failure(here + " range: expected [low, high] integers; recompile the model");
      }
      spec.low = *low;
      spec.high = *high;
    }
    specs.push_back(std::move(spec));
  }
  return specs;
}

// A manifest key that is missing or wrong, worded as moec's Python reader words it.
Failure DamagedManifest(const std::string& where, const std::string& what) {
  return Failure(where + ": damaged manifest: " + what + "; recompile the model");
}

// The value of `key` ("library", "weights"), `fallback` when absent: a file name in the artifact
// directory, never a path that could lead out of it.
std::string ParseFileName(const ffi::Map<ffi::Any, ffi::Any>& root, const char* key, const char* fallback,
                          const std::string& where) {
  if (!root.count(ffi::String(key))) return fallback;
  std::string name = AsString(Field(root, key, where), where + " '" + key + "'");
  const std::string separators("/\\\0", 3);  // and NUL, where the OS would cut the path short
  if (name.empty() || name == "." || name == ".." || name.find_first_of(separators) != std::string::npos) {
    throw DamagedManifest(where, std::string("'") + key +
                                     "' must be a file name inside the artifact directory, got '" + name + "'");
  }
  return name;
}

// "files"."<name>": the size and SHA-256 the manifest records for the artifact's file `name`.
FileRecord ParseFileRecord(const ffi::Map<ffi::Any, ffi::Any>& files, const std::string& name,
                           const std::string& where) {
  auto damaged = [&](const std::string& what) { return DamagedManifest(where, what); };
  auto found = files.Get(ffi::String(name));
  if (!found.has_value()) throw damaged("'files' has no '" + name + "'");
  const std::string key = "files." + name;
  auto object = found->try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!object.has_value()) throw damaged("'" + key + "' must be an object");
  auto bytes = object->Get(ffi::String("bytes"));
  auto count = bytes.has_value() ? bytes->as<int64_t>() : std::nullopt;
  if (!count.has_value() || *count < 0) throw damaged("'" + key + ".bytes' must be a non-negative integer");
  auto sha256 = object->Get(ffi::String("sha256"));
  auto text = sha256.has_value() ? sha256->try_cast<ffi::String>() : std::nullopt;
  const std::string hex = text.has_value() ? std::string(*text) : "";
  if (hex.size() != 64 || hex.find_first_not_of("0123456789abcdef") != std::string::npos) {
    throw damaged("'" + key + ".sha256' must be a SHA-256 (64 lowercase hex digits)");
  }
  return {*count, hex};
}

Manifest LoadManifest(const fs::path& dir) {
  fs::path path = dir / "manifest.json";
  if (!fs::is_directory(dir)) throw Failure(dir.string() + ": no such artifact directory");
  if (!fs::is_regular_file(path)) {
    throw Failure(dir.string() + ": not a moec artifact directory (no manifest.json)");
  }
  std::string where = path.string();
  std::string error;
  ffi::Any root_value = ParseJson(ReadFile(path, "manifest"), &error);
  if (!error.empty()) throw Failure(where + ": corrupt manifest (" + error + ")");
  auto root = root_value.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!root.has_value()) throw Failure(where + ": corrupt manifest (not an object)");
  std::string format = AsString(Field(*root, "format", where), where + " format");
  if (format != kFormat) {
    throw Failure(where + ": unknown artifact format '" + format + "'; this runner reads " + kFormat);
  }
  Manifest manifest;
  manifest.library = ParseFileName(*root, "library", "model.so", where);
  manifest.weights = ParseFileName(*root, "weights", "weights.bin", where);
  auto files = Field(*root, "files", where).try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!files.has_value()) throw DamagedManifest(where, "'files' must be an object");
  for (const std::string& name : {manifest.library, manifest.weights}) {
    manifest.files[name] = ParseFileRecord(*files, name, where);
  }
  manifest.inputs = ParseSpecs(*root, "inputs", where);
  manifest.outputs = ParseSpecs(*root, "outputs", where);
  for (const ffi::Any& name : AsList(Field(*root, "params", where), where + " 'params'")) {
    manifest.params.push_back(AsString(name, where + " 'params'"));
  }
  // "target" is absent from hand-written manifests (CPU); "cuda" is null for CPU targets.
  if (root->count(ffi::String("target"))) {
    auto target = Field(*root, "target", where).try_cast<ffi::Map<ffi::Any, ffi::Any>>();
    if (!target.has_value()) throw Failure(where + " 'target': expected an object; recompile the model");
    auto cuda = target->Get(ffi::String("cuda"));
    manifest.cuda = cuda.has_value() && *cuda != nullptr;
  }
  if (root->count(ffi::String("entries"))) {
    auto entries = Field(*root, "entries", where).try_cast<ffi::Map<ffi::Any, ffi::Any>>();
    if (!entries.has_value()) throw Failure(where + " 'entries': expected an object; recompile the model");
    auto one_token = entries->Get(ffi::String("one_token"));
    if (one_token.has_value()) manifest.one_token = AsString(*one_token, where + " 'entries'");
  }
  return manifest;
}

// The library function for these inputs: the one-token entry point when the artifact has one and
// every symbolic input dimension is 1 (static shapes and memory), else main.
std::string EntryFor(const Manifest& manifest, const std::vector<Array>& arrays) {
  if (manifest.one_token.empty()) return "main";
  for (size_t i = 0; i < manifest.inputs.size(); ++i) {
    const TensorSpec& spec = manifest.inputs[i];
    for (size_t axis = 0; axis < spec.shape.size(); ++axis) {
      if (spec.shape[axis] < 0 && arrays[i].shape[axis] != 1) return "main";
    }
  }
  return manifest.one_token;
}

// ---------------------------------------------------------------------------------------------
// Artifact integrity: each file's size and SHA-256 against the manifest's "files" record.

// SHA-256 (FIPS 180-4). Only the block compression differs by CPU, chosen once per process: the
// CPU's SHA-256 instructions where it has them (x86-64 SHA-NI; aarch64 ARMv8 SHA2, e.g. Orin's
// A78AE but not a Raspberry Pi 4's A72), else the portable C++. SHA-NI hashes at hashlib's speed,
// 5-6 times the portable code's (1.7 vs 0.3 GB/s, benchmarks/bench_integrity.py). Padding and
// finalisation are shared (class Sha256). MOEC_RUNNER_SHA256 forces one (see the header comment).

const uint32_t kSha256K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

// Folds `count` 64-byte blocks at `data` into `state` (a..h).
using Sha256Compress = void (*)(uint32_t state[8], const unsigned char* data, size_t count);

uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void CompressPortable(uint32_t state[8], const unsigned char* data, size_t count) {
  const uint32_t* const k = kSha256K;
  for (; count > 0; --count, data += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {  // big-endian words
      w[i] = static_cast<uint32_t>(data[4 * i]) << 24 | static_cast<uint32_t>(data[4 * i + 1]) << 16 |
             static_cast<uint32_t>(data[4 * i + 2]) << 8 | static_cast<uint32_t>(data[4 * i + 3]);
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = Rotr(w[i - 15], 7) ^ Rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = Rotr(w[i - 2], 17) ^ Rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (Rotr(e, 6) ^ Rotr(e, 11) ^ Rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (Rotr(a, 2) ^ Rotr(a, 13) ^ Rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    const uint32_t sums[8] = {a, b, c, d, e, f, g, h};
    for (int i = 0; i < 8; ++i) state[i] += sums[i];
  }
}

// Both instruction sets work on groups of 4 rounds: w[j % 4] holds message words 4j..4j+3, the
// next group's computed in place from the previous four (the schedule's W[t-16], W[t-15],
// W[t-7] and W[t-2] terms), and the unrolled loop keeps w[] in registers.
#if defined(__x86_64__)
// SHA-NI keeps the state as two vectors, ABEF and CDGH (highest lane first); sha256rnds2 does two
// rounds with the low two words of W+K, advancing ABEF into the CDGH operand's register.
__attribute__((target("sha,sse4.1"))) void CompressHardware(uint32_t state[8], const unsigned char* data,
                                                            size_t count) {
  const __m128i big_endian = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
  auto load = [](const void* from) { return _mm_loadu_si128(static_cast<const __m128i*>(from)); };
  const __m128i cdab = _mm_shuffle_epi32(load(state), 0xB1);
  __m128i cdgh = _mm_shuffle_epi32(load(state + 4), 0x1B);  // EFGH for now
  __m128i abef = _mm_alignr_epi8(cdab, cdgh, 8);
  cdgh = _mm_blend_epi16(cdgh, cdab, 0xF0);
  for (; count > 0; --count, data += 64) {
    const __m128i abef0 = abef, cdgh0 = cdgh;
    __m128i w[4];
    for (int i = 0; i < 4; ++i) w[i] = _mm_shuffle_epi8(load(data + 16 * i), big_endian);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (j >= 4) {
        __m128i x = _mm_sha256msg1_epu32(w[j % 4], w[(j + 1) % 4]);
        x = _mm_add_epi32(x, _mm_alignr_epi8(w[(j + 3) % 4], w[(j + 2) % 4], 4));
        w[j % 4] = _mm_sha256msg2_epu32(x, w[(j + 3) % 4]);
      }
      const __m128i wk = _mm_add_epi32(w[j % 4], load(kSha256K + 4 * j));
      cdgh = _mm_sha256rnds2_epu32(cdgh, abef, wk);  // rounds 4j, 4j+1: cdgh now holds ABEF
      abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(wk, 0x0E));  // 4j+2, 4j+3
    }
    abef = _mm_add_epi32(abef, abef0);
    cdgh = _mm_add_epi32(cdgh, cdgh0);
  }
  const __m128i feba = _mm_shuffle_epi32(abef, 0x1B);
  const __m128i dchg = _mm_shuffle_epi32(cdgh, 0xB1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state), _mm_blend_epi16(feba, dchg, 0xF0));  // DCBA
  _mm_storeu_si128(reinterpret_cast<__m128i*>(state + 4), _mm_alignr_epi8(dchg, feba, 8));  // HGFE
}

bool HasSha256Instructions() { return __builtin_cpu_supports("sha") && __builtin_cpu_supports("sse4.1"); }
#elif defined(__aarch64__)
// ARMv8's SHA2 instructions keep the state as ABCD and EFGH; sha256h/sha256h2 do four rounds.
// "+crypto" (AES and SHA2) is what GCC 12's arm_neon.h guards these intrinsics with.
__attribute__((target("+crypto"))) void CompressHardware(uint32_t state[8], const unsigned char* data,
                                                        size_t count) {
  uint32x4_t abcd = vld1q_u32(state), efgh = vld1q_u32(state + 4);
  for (; count > 0; --count, data += 64) {
    const uint32x4_t abcd0 = abcd, efgh0 = efgh;
    uint32x4_t w[4];
    for (int i = 0; i < 4; ++i) w[i] = vreinterpretq_u32_u8(vrev32q_u8(vld1q_u8(data + 16 * i)));
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if (j >= 4) {
        const uint32x4_t x = vsha256su0q_u32(w[j % 4], w[(j + 1) % 4]);
        w[j % 4] = vsha256su1q_u32(x, w[(j + 2) % 4], w[(j + 3) % 4]);
      }
      const uint32x4_t wk = vaddq_u32(w[j % 4], vld1q_u32(kSha256K + 4 * j));
      const uint32x4_t before = abcd;
      abcd = vsha256hq_u32(abcd, efgh, wk);
      efgh = vsha256h2q_u32(efgh, before, wk);
    }
    abcd = vaddq_u32(abcd, abcd0);
    efgh = vaddq_u32(efgh, efgh0);
  }
  vst1q_u32(state, abcd);
  vst1q_u32(state + 4, efgh);
}

bool HasSha256Instructions() { return (getauxval(AT_HWCAP) & HWCAP_SHA2) != 0; }
#else
constexpr Sha256Compress CompressHardware = nullptr;
bool HasSha256Instructions() { return false; }
#endif

// The compression this process uses, chosen on first use: the instructions when the CPU has them,
// unless MOEC_RUNNER_SHA256 says otherwise ("portable", or "hardware" to fail without them: tests
// and benchmarks use it to run each version on purpose).
Sha256Compress ChosenCompress() {
  static const Sha256Compress chosen = []() -> Sha256Compress {
    const char* setting = std::getenv("MOEC_RUNNER_SHA256");
    const std::string want = setting == nullptr ? "" : setting;
    if (want == "portable") return CompressPortable;
    if (want != "" && want != "hardware") {
      throw Failure("MOEC_RUNNER_SHA256 must be 'portable' or 'hardware', got '" + want + "'");
    }
    if (HasSha256Instructions()) return CompressHardware;
    if (want == "hardware") {
      throw Failure("MOEC_RUNNER_SHA256=hardware: this CPU has no SHA-256 instructions");
    }
    return CompressPortable;
  }();
  return chosen;
}

// Fed in pieces, so that a file is hashed without holding it in memory.
class Sha256 {
 public:
  void Update(const unsigned char* data, size_t size) {
    length_ += size;
    if (used_ > 0) {  // top up the pending partial block first
      const size_t take = std::min(size, sizeof(block_) - used_);
      std::memcpy(block_ + used_, data, take);
      used_ += take;
      data += take;
      size -= take;
      if (used_ < sizeof(block_)) return;
      compress_(state_, block_, 1);
      used_ = 0;
    }
    const size_t whole = size / sizeof(block_);  // then whole blocks straight from `data`
    if (whole > 0) compress_(state_, data, whole);
    std::memcpy(block_, data + whole * sizeof(block_), size % sizeof(block_));  // keep the rest
    used_ = size % sizeof(block_);
  }

  // The digest as 64 lowercase hex digits; call once, after the last Update.
  std::string HexDigest() {
    const uint64_t bits = length_ * 8;
    const unsigned char one = 0x80, zero = 0;
    Update(&one, 1);  // padding: a 1 bit, zeros up to 8 bytes short of a block, the bit length
    while (used_ != sizeof(block_) - 8) Update(&zero, 1);
    unsigned char length[8];
    for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(bits >> (56 - 8 * i));
    Update(length, 8);
    const char* const digits = "0123456789abcdef";
    std::string hex;
    for (uint32_t word : state_) {
      for (int shift = 28; shift >= 0; shift -= 4) hex += digits[(word >> shift) & 0xf];
    }
    return hex;
  }

 private:
  const Sha256Compress compress_ = ChosenCompress();
  uint32_t state_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                        0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  unsigned char block_[64];
  size_t used_ = 0;  // bytes of block_ filled
  uint64_t length_ = 0;  // bytes hashed
};

// An open file descriptor, closed when it goes.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

// Refuses `dir`/`name` unless it is a regular file of the recorded size and, with `check_hash`,
// SHA-256: a truncated, changed or half-copied artifact fails here, before anything of it is loaded.
void CheckFile(const fs::path& dir, const std::string& name, const FileRecord& record, bool check_hash) {
  const fs::path path = dir / name;
  const std::string advice = "; recompile the model or copy the artifact again";
  std::error_code ignored;
  if (!fs::is_regular_file(path, ignored)) {  // checked before open(), which a FIFO would block
    throw Failure(path.string() + ": damaged artifact: the file is missing" + advice);
  }
  Fd file{open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  struct stat info;
  if (file.fd < 0 || fstat(file.fd, &info) != 0) {
    throw Failure(path.string() + ": cannot read (" + std::strerror(errno) + ")");
  }
  if (info.st_size != record.bytes) {
    throw Failure(path.string() + ": damaged artifact: " + std::to_string(info.st_size) +
                  " bytes, the manifest says " + std::to_string(record.bytes) + advice);
  }
  if (!check_hash) return;
  Sha256 sha;
  std::vector<unsigned char> chunk(1 << 20);
  for (;;) {
    ssize_t got = read(file.fd, chunk.data(), chunk.size());
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw Failure(path.string() + ": cannot read (" + std::strerror(errno) + ")");
    if (got == 0) break;
    sha.Update(chunk.data(), static_cast<size_t>(got));
  }
  if (sha.HexDigest() != record.sha256) {
    throw Failure(path.string() + ": damaged artifact: its SHA-256 differs from the manifest's" + advice);
  }
}

// ---------------------------------------------------------------------------------------------
// weights.bin (moec/weights_file.py's layout), memory-mapped: the weights are tensors over the
// mapping, so the CPU reads them in place from the page cache.
//
//   8 bytes magic "MOECWTS\0", u32 version, u32 index length L (little-endian); L bytes of JSON
//   {"tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]}; the data region from
//   16 + L rounded up to 4096, each tensor at data + offset (a multiple of 64).

const char kWeightsMagic[8] = {'M', 'O', 'E', 'C', 'W', 'T', 'S', '\0'};
const uint32_t kWeightsVersion = 1;
const size_t kWeightsHeader = 16;
const size_t kWeightsAlignment = 64;
const size_t kWeightsPage = 4096;

// A private, read-only mapping of a whole file; unmapped when the last tensor over it goes.
class Mapping {
 public:
  Mapping(void* data, size_t size) : data_(static_cast<char*>(data)), size_(size) {}
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { munmap(data_, size_); }
  char* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  char* data_;
  size_t size_;
};

// ffi::Tensor::FromNDAlloc's allocator for a tensor over a mapping: it points into the mapping
// and holds it, so the mapping outlives every tensor over it.
struct MappedSlice {
  std::shared_ptr<const Mapping> mapping;
  size_t offset;
  void AllocData(DLTensor* tensor) { tensor->data = mapping->data() + offset; }
  void FreeData(DLTensor*) {}
};

uint32_t ReadU32(const char* bytes) {
  const auto* u = reinterpret_cast<const unsigned char*>(bytes);
  return static_cast<uint32_t>(u[0]) | (static_cast<uint32_t>(u[1]) << 8) |
         (static_cast<uint32_t>(u[2]) << 16) | (static_cast<uint32_t>(u[3]) << 24);
}

// `path` mapped whole, advised huge pages; a file too short to be a weights file is refused.
std::shared_ptr<const Mapping> MapFile(const fs::path& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Failure(path.string() + ": cannot read weights (" + std::strerror(errno) + ")");
  struct stat info;
  if (fstat(fd, &info) != 0) {
    int stat_errno = errno;
    close(fd);
    throw Failure(path.string() + ": cannot read weights (" + std::strerror(stat_errno) + ")");
  }
  if (info.st_size < static_cast<off_t>(kWeightsHeader)) {
    close(fd);
    throw Failure(path.string() + ": damaged weights (" + std::to_string(info.st_size) +
                  " bytes, shorter than its " + std::to_string(kWeightsHeader) +
                  "-byte header); recompile the model");
  }
  size_t size = static_cast<size_t>(info.st_size);
  void* data = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int mapped_errno = errno;
  close(fd);
  if (data == MAP_FAILED) {
    throw Failure(path.string() + ": cannot map weights (" + std::strerror(mapped_errno) + ")");
  }
#ifdef MADV_HUGEPAGE
  madvise(data, size, MADV_HUGEPAGE);  // advice: a kernel without huge pages ignores it
#endif
  return std::make_shared<const Mapping>(data, size);
}

// The weights in `path` by name: CPU tensors over one mapping of the file. A file that is not
// what moec/weights_file.py writes is "damaged weights", with what is wrong.
std::map<std::string, ffi::Tensor> LoadWeights(const fs::path& path) {
  auto fail = [&](const std::string& why) {
    return Failure(path.string() + ": damaged weights (" + why + "); recompile the model");
  };
  std::shared_ptr<const Mapping> mapping = MapFile(path);
  const char* bytes = mapping->data();
  if (std::memcmp(bytes, kWeightsMagic, sizeof(kWeightsMagic)) != 0) {
    throw fail("bad magic, not a moec weights file");
  }
  uint32_t version = ReadU32(bytes + 8);
  if (version != kWeightsVersion) {
    throw fail("format version " + std::to_string(version) + "; this runner reads " +
               std::to_string(kWeightsVersion));
  }
  size_t length = ReadU32(bytes + 12);
  if (kWeightsHeader + length > mapping->size()) throw fail("its index runs past the end of the file");
  size_t start = (kWeightsHeader + length + kWeightsPage - 1) / kWeightsPage * kWeightsPage;

  std::string error;
  ffi::Any index = ParseJson(std::string(bytes + kWeightsHeader, length), &error);
  if (!error.empty()) throw fail("unreadable index: " + error);
  auto root = index.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!root.has_value()) throw fail("unreadable index: not an object");
  auto tensors = root->Get(ffi::String("tensors"));
  auto list = tensors.has_value() ? tensors->try_cast<ffi::Array<ffi::Any>>() : std::nullopt;
  if (!list.has_value()) throw fail("unreadable index: no 'tensors' list");
  std::map<std::string, ffi::Tensor> weights;
  for (const ffi::Any& item : *list) {
    auto entry = item.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
    auto get = [&](const char* key) {
      auto value = entry.has_value() ? entry->Get(ffi::String(key)) : std::nullopt;
      if (!value.has_value()) throw fail(std::string("unreadable index: an entry without '") + key + "'");
      return *value;
    };
    auto name_text = get("name").try_cast<ffi::String>();
    auto dtype_text = get("dtype").try_cast<ffi::String>();
    auto dims = get("shape").try_cast<ffi::Array<ffi::Any>>();
    auto offset = get("offset").as<int64_t>();
    auto nbytes = get("nbytes").as<int64_t>();
    if (!name_text.has_value() || !dtype_text.has_value() || !dims.has_value()) {
      throw fail("unreadable index: an entry with a mistyped name, dtype or shape");
    }
    const std::string name(*name_text);
    const std::string dtype_name(*dtype_text);
    const DType* dtype = DTypeFromName(dtype_name);
    if (dtype == nullptr) throw fail("tensor '" + name + "' has unknown dtype '" + dtype_name + "'");
    std::vector<int64_t> shape;
    for (const ffi::Any& dim : *dims) {
      auto size = dim.as<int64_t>();
      if (!size.has_value()) throw fail("tensor '" + name + "' has a bad shape");
      shape.push_back(*size);
    }
    std::optional<int64_t> expected = ByteSize(shape, *dtype);
    if (!expected.has_value()) throw fail("tensor '" + name + "' has a bad shape");
    if (!offset.has_value() || !nbytes.has_value() || *offset < 0 || *nbytes != *expected) {
      throw fail("tensor '" + name + "' has a bad offset or size");
    }
    if (*offset % static_cast<int64_t>(kWeightsAlignment) != 0) {
      throw fail("tensor '" + name + "' at offset " + std::to_string(*offset) + ", not a multiple of " +
                 std::to_string(kWeightsAlignment));
    }
    const size_t size = mapping->size();  // compared without overflow: offsets come from the file
    const uint64_t offset_bytes = static_cast<uint64_t>(*offset);
    const uint64_t data_bytes = static_cast<uint64_t>(*nbytes);
    if (start > size || offset_bytes > size - start || data_bytes > size - start - offset_bytes) {
      throw fail("tensor '" + name + "' ends past the end of the file (" + std::to_string(size) +
                 " bytes): truncated");
    }
    const size_t at = start + static_cast<size_t>(offset_bytes);
    ffi::ShapeView dims_view(shape.data(), shape.size());
    ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(MappedSlice{mapping, at}, dims_view, dtype->dl, kCPU);
    if (!weights.emplace(name, tensor).second) throw fail("tensor '" + name + "' twice");
  }
  return weights;
}

// ---------------------------------------------------------------------------------------------
// Tensors, through the runtime's registered global functions.

ffi::Tensor Allocate(const ffi::Shape& shape, DLDataType dtype, DLDevice device) {
  ffi::Function alloc = ffi::Function::GetGlobalRequired("runtime.TVMTensorAllocWithScope");
  return alloc(shape, dtype, device, ffi::Optional<ffi::String>()).cast<ffi::Tensor>();
}

// A tensor on `device` holding `array` (the runtime copies host bytes to any device).
ffi::Tensor ToDevice(const Array& array, DLDevice device) {
  ffi::Function copy = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyFromBytes");
  ffi::Tensor tensor = Allocate(ffi::Shape(array.shape.begin(), array.shape.end()), array.dtype->dl, device);
  copy(tensor, static_cast<void*>(const_cast<char*>(array.data.data())), static_cast<int64_t>(array.data.size()));
  return tensor;
}

// `tensor` (loaded on the CPU) as a tensor on `device`: itself for the CPU, else a copy.
ffi::Tensor ToDevice(const ffi::Tensor& tensor, DLDevice device) {
  if (device.device_type == kDLCPU) return tensor;
  ffi::Tensor copy = Allocate(tensor.shape(), tensor.dtype(), device);
  ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyFromTo")(tensor, copy);
  return copy;
}

// Waits until `device` has finished its queued work (a no-op on the CPU).
void Synchronize(DLDevice device) {
  if (device.device_type == kDLCPU) return;
  ffi::Function::GetGlobalRequired("runtime.Device_StreamSync")(device, static_cast<int64_t>(0));
}

void WriteOutput(const ffi::Tensor& tensor, const fs::path& path) {
  ffi::Function copy = ffi::Function::GetGlobalRequired("runtime.TVMTensorCopyToBytes");
  const DType* dtype = DTypeFromDL(tensor.dtype());
  if (dtype == nullptr) {
    throw Failure(path.string() + ": output dtype (code " + std::to_string(tensor.dtype().code) + ", " +
                  std::to_string(tensor.dtype().bits) + " bits) has no npy equivalent here");
  }
  std::vector<int64_t> shape(tensor.shape().begin(), tensor.shape().end());
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  std::string data(static_cast<size_t>(count) * ItemSize(*dtype), '\0');
  if (!data.empty()) copy(tensor, static_cast<void*>(data.data()), static_cast<int64_t>(data.size()));
  SaveNpy(path, *dtype, shape, data);
}

// An output's file name: its ONNX name with path separators replaced ("a/b" -> "a_b.npy").
std::string FileStem(std::string name) {
  std::replace(name.begin(), name.end(), '/', '_');
  std::replace(name.begin(), name.end(), '\\', '_');
  return name.empty() || name == "." || name == ".." ? "_" + name : name;
}

// ---------------------------------------------------------------------------------------------
// Command line.

struct Options {
  fs::path artifact;
  std::vector<std::pair<std::string, std::string>> inputs;  // name, path
  fs::path output_dir;  // empty: outputs are not written
  bool random_inputs = false;
  int tokens = 1;
  int seed = 0;
  int repeat = 0;
  int warmup = 5;
  int threads = 0;  // 0: the runtime's default (TVM_NUM_THREADS, else one per core)
  bool hash_check = true;  // --skip-hash-check: check the files' sizes only
  bool kernel_times = false;  // --kernel-times: per-kernel GPU time over --repeat more calls
};

int ParseCount(const std::string& flag, const std::string& text) {
  size_t used = 0;
  long value = -1;
  try {
    value = std::stol(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty() || value < 0 || value > 1000000000) {
    throw UsageError(flag + " expects a non-negative integer, got '" + text + "'");
  }
  return static_cast<int>(value);
}

Options ParseArgs(int argc, char** argv) {
  Options options;
  bool have_artifact = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool inline_value = false;
    if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos) {
      value = arg.substr(arg.find('=') + 1);
      arg = arg.substr(0, arg.find('='));
      inline_value = true;
    }
    auto next = [&]() -> std::string {
      if (inline_value) return value;
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::printf("%s\n", kUsage);
      std::exit(0);
    } else if (arg == "--input") {
      std::string spec = next();
      size_t eq = spec.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == spec.size()) {
        throw UsageError("--input expects NAME=path.npy, got '" + spec + "'");
      }
      options.inputs.emplace_back(spec.substr(0, eq), spec.substr(eq + 1));
    } else if (arg == "--output-dir") {
      options.output_dir = next();
    } else if (arg == "--repeat") {
      options.repeat = ParseCount(arg, next());
    } else if (arg == "--warmup") {
      options.warmup = ParseCount(arg, next());
    } else if (arg == "--random-inputs") {
      if (inline_value) throw UsageError("--random-inputs takes no value");
      options.random_inputs = true;
    } else if (arg == "--kernel-times") {
      if (inline_value) throw UsageError("--kernel-times takes no value");
      options.kernel_times = true;
    } else if (arg == "--skip-hash-check") {
      if (inline_value) throw UsageError("--skip-hash-check takes no value");
      options.hash_check = false;
    } else if (arg == "--tokens") {
      options.tokens = ParseCount(arg, next());
      if (options.tokens == 0) throw UsageError("--tokens must be at least 1");
    } else if (arg == "--seed") {
      options.seed = ParseCount(arg, next());
    } else if (arg == "--threads") {
      options.threads = ParseCount(arg, next());
      if (options.threads == 0) throw UsageError("--threads must be at least 1");
    } else if (arg.rfind("-", 0) == 0 && arg.size() > 1) {
      throw UsageError("unknown option " + arg);
    } else if (!have_artifact) {
      options.artifact = arg;
      have_artifact = true;
    } else {
      throw UsageError("unexpected argument '" + arg + "'");
    }
  }
  if (!have_artifact) throw UsageError("missing ARTIFACT_DIR");
  if (options.kernel_times && options.repeat == 0) throw UsageError("--kernel-times needs --repeat N");
  return options;
}

// ---------------------------------------------------------------------------------------------

// "[?, 32]": a shape, with -1 (a symbolic dimension) as '?'.
std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) text += ", ";
    text += shape[i] < 0 ? "?" : std::to_string(shape[i]);
  }
  return text + "]";
}

// Random values for `spec`: its last symbolic dimension is `tokens` long, other symbolic ones 1
// (as moec's random_inputs); floats standard normal, integers and booleans 0 or 1.
Array RandomInput(const TensorSpec& spec, int tokens, std::mt19937_64& rng) {
  Array array;
  array.dtype = DTypeFromName(spec.dtype);
  if (array.dtype == nullptr || spec.dtype == "float16") {
    throw Failure("input '" + spec.name + "' has dtype " + spec.dtype +
                  ", which --random-inputs cannot make; pass --input " + spec.name + "=path.npy");
  }
  std::string last_symbol;
  for (const std::string& symbol : spec.symbols) {
    if (!symbol.empty()) last_symbol = symbol;
  }
  for (size_t i = 0; i < spec.shape.size(); ++i) {
    array.shape.push_back(spec.shape[i] >= 0 ? spec.shape[i] : spec.symbols[i] == last_symbol ? tokens : 1);
  }
  // The shape comes from the manifest: its size must fit in int64 and in this machine's memory.
  std::optional<int64_t> bytes = ByteSize(array.shape, *array.dtype);
  const long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGE_SIZE);  // <= 0: unknown
  if (!bytes.has_value() || (pages > 0 && page_size > 0 && *bytes / page_size >= pages)) {
    throw Failure("input '" + spec.name + "' of shape " + ShapeText(array.shape) +
                  " is larger than this machine's memory");
  }
  array.data.resize(static_cast<size_t>(*bytes));
  const int64_t count = *bytes / static_cast<int64_t>(ItemSize(*array.dtype));
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int64_t> integer(spec.low, spec.high - 1);
  const size_t item = ItemSize(*array.dtype);
  char* out = array.data.data();
  for (int64_t i = 0; i < count; ++i) {
    if (spec.dtype == "float32") {
      reinterpret_cast<float*>(out)[i] = static_cast<float>(normal(rng));
    } else if (spec.dtype == "float64") {
      reinterpret_cast<double*>(out)[i] = normal(rng);
    } else if (spec.dtype == "bool") {
      out[i] = static_cast<char>(integer(rng) != 0);
    } else {  // little-endian integers over the input's range (token ids: the vocabulary)
      const int64_t value = integer(rng);
      std::memcpy(out + static_cast<size_t>(i) * item, &value, item);
    }
  }
  return array;
}

// Inputs in manifest order, checked against the manifest's names, dtypes and fixed dimensions;
// with --random-inputs, those not given are made up.
std::vector<Array> LoadInputs(const Manifest& manifest, const Options& options) {
  std::map<std::string, std::string> given;
  std::string expected;
  for (const TensorSpec& spec : manifest.inputs) expected += (expected.empty() ? "" : ", ") + spec.name;
  for (const auto& [name, path] : options.inputs) {
    bool known = std::any_of(manifest.inputs.begin(), manifest.inputs.end(),
                             [&](const TensorSpec& s) { return s.name == name; });
    if (!known) throw Failure("unknown input '" + name + "' (expected: " + expected + ")");
    if (!given.emplace(name, path).second) throw Failure("input '" + name + "' given twice");
  }
  std::vector<Array> arrays;
  std::mt19937_64 rng(static_cast<uint64_t>(options.seed));
  for (const TensorSpec& spec : manifest.inputs) {
    auto found = given.find(spec.name);
    if (found == given.end() && options.random_inputs) {
      arrays.push_back(RandomInput(spec, options.tokens, rng));
      continue;
    }
    if (found == given.end()) {
      throw Failure("missing input '" + spec.name + "' (pass --input " + spec.name +
                    "=path.npy or --random-inputs; expected: " + expected + ")");
    }
    Array array = LoadNpy(found->second);
    if (spec.dtype != array.dtype->name) {
      throw Failure(found->second + ": input '" + spec.name + "' has dtype " + array.dtype->name +
                    ", expected " + spec.dtype);
    }
    bool fits = array.shape.size() == spec.shape.size();
    for (size_t i = 0; fits && i < spec.shape.size(); ++i) {
      fits = spec.shape[i] < 0 || spec.shape[i] == array.shape[i];
    }
    if (!fits) {
      throw Failure(found->second + ": input '" + spec.name + "' has shape " + ShapeText(array.shape) +
                    ", expected " + ShapeText(spec.shape));
    }
    arrays.push_back(std::move(array));
  }
  return arrays;
}

std::vector<ffi::Tensor> Outputs(const ffi::Any& result, size_t expected) {
  std::vector<ffi::Tensor> tensors;
  if (auto tensor = result.try_cast<ffi::Tensor>()) {
    tensors.push_back(*tensor);
  } else if (auto tuple = result.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *tuple) {
      auto element = item.try_cast<ffi::Tensor>();
      if (!element.has_value()) throw Failure("main returned a tuple holding a non-tensor");
      tensors.push_back(*element);
    }
  } else {
    throw Failure("main returned " + std::string(result.GetTypeKey()) + ", expected tensors");
  }
  if (tensors.size() != expected) {
    throw Failure("main returned " + std::to_string(tensors.size()) + " outputs, the manifest names " +
                  std::to_string(expected) + "; recompile the model");
  }
  return tensors;
}

// "peak RSS N MiB": the peak resident memory of this program: /proc/self/status's VmHWM, not
// getrusage's ru_maxrss, which Linux carries over exec from the parent (a runner started by a
// Python process would report that process's peak); ru_maxrss only where there is no VmHWM.
std::string PeakRss() {
  long kib = -1;
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) kib = std::strtol(line.c_str() + 6, nullptr, 10);
  }
  struct rusage usage;
  if (kib <= 0 && getrusage(RUSAGE_SELF, &usage) == 0) kib = usage.ru_maxrss;  // KiB on Linux
  if (kib <= 0) return "peak RSS unknown";
  return "peak RSS " + std::to_string((kib + 512) / 1024) + " MiB";
}

// Makes `calls` more calls with every kernel launch timed (cuda_driver.cc) and prints each
// kernel's launches and GPU time per call, most time first.
template <typename Call>
void PrintKernelTimes(const Call& call, int calls) {
  moec::SetKernelTiming(true);
  for (int i = 0; i < calls; ++i) {
    call();
    moec::KernelTimes();  // reads this call's events, so that they are reused
  }
  moec::SetKernelTiming(false);
  std::vector<moec::KernelTime> times = moec::KernelTimes();
  double total = 0;
  for (const moec::KernelTime& time : times) total += time.milliseconds;
  for (const moec::KernelTime& time : times) {
    std::printf("kernel %s: %g launches, %.4f ms per call, %.1f%% of kernel time (%s)\n", time.kernel.c_str(),
                static_cast<double>(time.launches) / calls, time.milliseconds / calls,
                total > 0 ? 100.0 * time.milliseconds / total : 0.0, time.shape.c_str());
  }
  std::printf("kernels: %.4f ms per call in all, over %d calls\n", total / calls, calls);
}

double Percentile(std::vector<double> sorted, double q) {  // numpy's default (linear) method
  double at = q / 100.0 * static_cast<double>(sorted.size() - 1);
  size_t low = static_cast<size_t>(at);
  size_t high = std::min(low + 1, sorted.size() - 1);
  return sorted[low] + (sorted[high] - sorted[low]) * (at - static_cast<double>(low));
}

int Run(const Options& options) {
  // TVM's CPU thread pool reads TVM_NUM_THREADS when it starts, at the first kernel call.
  if (options.threads > 0) setenv("TVM_NUM_THREADS", std::to_string(options.threads).c_str(), 1);
  Manifest manifest = LoadManifest(options.artifact);
  fs::path library = options.artifact / manifest.library;
  fs::path weights = options.artifact / manifest.weights;
  for (const std::string& name : {manifest.library, manifest.weights}) {
    CheckFile(options.artifact, name, manifest.files.at(name), options.hash_check);
  }
  std::vector<Array> arrays = LoadInputs(manifest, options);
  const std::string entry = EntryFor(manifest, arrays);
  const DLDevice device = manifest.cuda ? kCUDA : kCPU;
  if (options.kernel_times && !manifest.cuda) {
    throw Failure("--kernel-times times CUDA kernels and this artifact runs on the CPU; 'moec run --profile' "
                  "times its functions");
  }
  if (manifest.cuda) std::printf("device: %s\n", moec::InstallCudaDriverRuntime(device.device_id).c_str());

  // Weights: tensors over the mapped file, used in place on the CPU and copied to a GPU; the
  // mapping goes with the last tensor over it (on a GPU, when `stored` does).
  std::vector<ffi::Any> args;
  for (const Array& array : arrays) args.emplace_back(ToDevice(array, device));
  arrays.clear();
  {
    std::map<std::string, ffi::Tensor> stored = LoadWeights(weights);
    for (const std::string& name : manifest.params) {
      auto found = stored.find(name);
      if (found == stored.end()) {
        throw Failure(weights.string() + ": weights lack '" + name + "'; recompile the model");
      }
      args.emplace_back(ToDevice(found->second, device));
    }
  }

  // The Relax VM: the library's executable, initialised for the device with the pooled
  // allocator; a GPU VM also gets the CPU as host device, where shape computations run.
  ffi::Optional<ffi::Module> vm;
  try {
    ffi::Module module = ffi::Module::LoadFromFile(ffi::String(library.string()));
    auto load = module->GetFunction(ffi::String("vm_load_executable"), true);
    if (!load.has_value()) throw Failure(library.string() + ": not a Relax VM executable; recompile the model");
    vm = (*load)().cast<ffi::Module>();
  } catch (const ffi::Error& err) {
    throw Failure(library.string() + ": cannot load (" + OneLine(err.message()) + "); recompile the model");
  }
  const int kPooledAllocator = 2;
  ffi::Function init = (*vm)->GetFunction(ffi::String("vm_initialization"), false).value();
  if (device.device_type == kDLCPU) {
    init(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  } else {
    init(static_cast<int>(device.device_type), device.device_id, kPooledAllocator, static_cast<int>(kDLCPU), 0,
         kPooledAllocator);
  }
  auto main_fn = (*vm)->GetFunction(ffi::String(entry), false);
  if (!main_fn.has_value()) {
    throw Failure(library.string() + ": executable has no '" + entry + "'; recompile the model");
  }

  std::vector<ffi::AnyView> views(args.begin(), args.end());
  auto call = [&]() {
    ffi::Any result;
    main_fn->CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
    Synchronize(device);
    return result;
  };

  std::vector<ffi::Tensor> outputs = Outputs(call(), manifest.outputs.size());
  if (!options.output_dir.empty()) {
    std::error_code made;
    fs::create_directories(options.output_dir, made);
    if (!fs::is_directory(options.output_dir)) {
      throw Failure(options.output_dir.string() + ": cannot create output directory");
    }
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    const DType* dtype = DTypeFromDL(outputs[i].dtype());
    std::vector<int64_t> shape(outputs[i].shape().begin(), outputs[i].shape().end());
    std::printf("output %s: shape %s %s\n", manifest.outputs[i].name.c_str(), ShapeText(shape).c_str(),
                dtype ? dtype->name : "(no npy dtype)");
    if (!options.output_dir.empty()) {
      WriteOutput(outputs[i], options.output_dir / (FileStem(manifest.outputs[i].name) + ".npy"));
    }
  }
  outputs.clear();

  if (options.repeat > 0) {
    for (int i = 0; i < options.warmup; ++i) call();
    std::vector<double> ms;
    for (int i = 0; i < options.repeat; ++i) {
      auto start = std::chrono::steady_clock::now();
      call();
      auto stop = std::chrono::steady_clock::now();
      ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
    }
    double mean = 0;
    for (double t : ms) mean += t / static_cast<double>(ms.size());
    std::sort(ms.begin(), ms.end());
    std::printf("latency over %d runs: mean %.4f ms, p50 %.4f ms, p99 %.4f ms\n", options.repeat, mean,
                Percentile(ms, 50), Percentile(ms, 99));
  }
  if (options.kernel_times) PrintKernelTimes(call, options.repeat);
  std::printf("%s\n", PeakRss().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(ParseArgs(argc, argv));
  } catch (const UsageError& err) {
    std::fprintf(stderr, "moec-runner: error: %s; %s\n", OneLine(err.what()).c_str(), kUsage);
    return 2;
  } catch (const ffi::Error& err) {
    std::fprintf(stderr, "moec-runner: error: %s: %s\n", err.kind().c_str(), OneLine(err.message()).c_str());
    return 1;
  } catch (const std::exception& err) {
    std::fprintf(stderr, "moec-runner: error: %s\n", OneLine(err.what()).c_str());
    return 1;
  }
}
