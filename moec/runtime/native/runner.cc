// moec-runner: run a moec artifact with TVM's runtime alone (no Python, no compiler).
//
// This is the program a user deploys on a board next to the artifact directory. It links only
// libtvm_runtime.so and libtvm_ffi.so:
//
//   moec-runner ARTIFACT_DIR [--input NAME=path.npy ...] [--random-inputs [--tokens T] [--seed S]]
//               [--output-dir DIR] [--repeat N] [--warmup W] [--threads T]
//
// It reads manifest.json (input, output and weight names, and whether the target is a CUDA
// GPU), maps weights.bin (moec/weights_file.py's layout: a header, a JSON index, 64-byte aligned
// tensors) privately and read-only, advised MADV_HUGEPAGE, and makes each weight a tensor over
// the mapping (nothing is copied on the CPU), loads the model library, creates the Relax VM
// ("vm_load_executable", "vm_initialization"), runs main(*inputs, *params) once (or the
// manifest's "entries"."one_token" function when every symbolic input dimension is 1), prints each
// output's shape and, with --output-dir, writes it as DIR/<output name>.npy ('/' in a name
// becomes '_'). --random-inputs makes every input not given with --input from random numbers
// (symbolic dimensions: T tokens, as `moec run --tokens` does), so that the model runs on a
// board without any input files. With --repeat N it then times N further runs (after W
// warmups, inputs already on the device). --threads T sets the CPU threads (TVM_NUM_THREADS).
// Last it prints its peak resident memory ("peak RSS N MiB", VmHWM).
//
// Device: CPU for llvm targets. For a CUDA target (manifest "target"."cuda" not null) the
// runner loads libtvm_runtime_cuda.so, creates the VM for the GPU with the CPU as host (for
// shape computations), copies inputs and weights (from the mapping) to the GPU and outputs back,
// and synchronises the GPU after each timed call.
// Every failure is one line on stderr ("moec-runner: error: ...") and exit status 1; usage
// errors (the line then ends with the usage) exit with status 2.

#include <dlfcn.h>
#include <dlpack/dlpack.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
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

namespace ffi = tvm::ffi;
namespace fs = std::filesystem;

namespace {

const char* const kUsage =
    "usage: moec-runner ARTIFACT_DIR [--input NAME=path.npy ...] [--random-inputs [--tokens T] "
    "[--seed S]] [--output-dir DIR] [--repeat N] [--warmup W] [--threads T]";
const char* const kFormat = "moec-artifact/2";
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

// ---------------------------------------------------------------------------------------------
// .npy files (format versions 1-3, C order, little-endian).

struct Array {
  const DType* dtype = nullptr;
  std::vector<int64_t> shape;
  std::string data;  // raw bytes, C order

  int64_t Count() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
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
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"')) {
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
  size_t expected = static_cast<size_t>(array.Count()) * ItemSize(*array.dtype);
  size_t have = bytes.size() - offset - header_len;
  if (have != expected) {
    throw Failure(path + ": .npy data has " + std::to_string(have) + " bytes, its header says " +
                  std::to_string(expected));
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

struct TensorSpec {
  std::string name;
  std::string dtype;                  // numpy name
  std::vector<int64_t> shape;         // -1 for a symbolic dimension
  std::vector<std::string> symbols;   // the symbolic dimension's name, "" for a fixed one
};

struct Manifest {
  std::string library = "model.so";
  std::string weights = "weights.bin";
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
      spec.shape.push_back(fixed.has_value() ? *fixed : -1);
      spec.symbols.push_back(fixed.has_value() ? "" : symbol.has_value() ? std::string(*symbol) : "?");
    }
    specs.push_back(std::move(spec));
  }
  return specs;
}

Manifest LoadManifest(const fs::path& dir) {
  fs::path path = dir / "manifest.json";
  if (!fs::is_directory(dir)) throw Failure(dir.string() + ": no such artifact directory");
  if (!fs::is_regular_file(path)) {
    throw Failure(dir.string() + ": not a moec artifact directory (no manifest.json)");
  }
  std::string where = path.string();
  ffi::String error;
  ffi::Any root_value = ffi::json::Parse(ReadFile(path, "manifest"), &error);
  if (!error.empty()) throw Failure(where + ": corrupt manifest (" + OneLine(error) + ")");
  auto root = root_value.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!root.has_value()) throw Failure(where + ": corrupt manifest (not an object)");
  std::string format = AsString(Field(*root, "format", where), where + " format");
  if (format != kFormat) {
    throw Failure(where + ": unknown artifact format '" + format + "'; this runner reads " + kFormat);
  }
  Manifest manifest;
  if (root->count(ffi::String("library"))) {
    manifest.library = AsString(Field(*root, "library", where), where + " library");
  }
  if (root->count(ffi::String("weights"))) {
    manifest.weights = AsString(Field(*root, "weights", where), where + " weights");
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

  ffi::String error;
  ffi::Any index = ffi::json::Parse(ffi::String(std::string(bytes + kWeightsHeader, length)), &error);
  if (!error.empty()) throw fail("unreadable index: " + OneLine(error));
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
    std::vector<int64_t> shape;
    int64_t count = 1;
    for (const ffi::Any& dim : *dims) {
      auto size = dim.as<int64_t>();
      const int64_t most = std::numeric_limits<int64_t>::max();
      if (!size.has_value() || *size < 0 || (*size > 0 && count > most / *size)) {
        throw fail("tensor '" + name + "' has a bad shape");
      }
      shape.push_back(*size);
      count *= *size;
    }
    const std::string dtype_name(*dtype_text);
    const DType* dtype = DTypeFromName(dtype_name);
    if (dtype == nullptr) throw fail("tensor '" + name + "' has unknown dtype '" + dtype_name + "'");
    if (!offset.has_value() || !nbytes.has_value() || *offset < 0 ||
        *nbytes != count * static_cast<int64_t>(ItemSize(*dtype))) {
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

// Registers the CUDA device API and the CUDA module loader (libtvm_runtime_cuda.so, found next
// to libtvm_runtime.so through this program's run path, like the other TVM libraries).
void LoadCudaRuntime() {
  const char* const kLib = "libtvm_runtime_cuda.so";
  if (dlopen(kLib, RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    const char* why = dlerror();
    throw Failure(std::string("this artifact runs on a CUDA GPU but ") + kLib + " cannot be loaded (" +
                  (why ? OneLine(why) : "unknown reason") +
                  "); it needs the NVIDIA driver (libcuda.so.1) and the CUDA runtime (libcudart)");
  }
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
  int64_t count = array.Count();
  array.data.resize(static_cast<size_t>(count) * ItemSize(*array.dtype));
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int> bit(0, 1);
  char* out = array.data.data();
  for (int64_t i = 0; i < count; ++i) {
    if (spec.dtype == "float32") {
      reinterpret_cast<float*>(out)[i] = static_cast<float>(normal(rng));
    } else if (spec.dtype == "float64") {
      reinterpret_cast<double*>(out)[i] = normal(rng);
    } else {  // little-endian integers and booleans: 0 or 1 in the lowest byte
      out[static_cast<size_t>(i) * ItemSize(*array.dtype)] = static_cast<char>(bit(rng));
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
  for (const fs::path& path : {library, weights}) {
    if (!fs::is_regular_file(path)) {
      throw Failure(options.artifact.string() + ": damaged artifact (no " + path.filename().string() +
                    "); recompile the model");
    }
  }
  std::vector<Array> arrays = LoadInputs(manifest, options);
  const std::string entry = EntryFor(manifest, arrays);
  const DLDevice device = manifest.cuda ? kCUDA : kCPU;
  if (manifest.cuda) LoadCudaRuntime();

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
