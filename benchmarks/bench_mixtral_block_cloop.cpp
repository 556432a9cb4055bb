// The benchmark's "C loop" reference: the Mixtral-style MoE block as plain hand-written C++.
//
// What: router matmul -> softmax -> top-k (ties to the lower index) -> renormalise, then for
// each selected expert gate/up GEMV, SiLU(gate) * up, down GEMV, weighted sum; fp32, no biases.
// Why: it shows what a straightforward native loop attains on this machine, so moec's
// numbers can be read against "attainable" as well as against the DRAM bandwidth bound.
// How: weights are copied once, at create time, into output-row-major matrices (every dot
// product streams contiguous memory) in 2 MiB-aligned memory advised MADV_HUGEPAGE (moec's
// runtime and numpy do the same for large arrays). Routing runs on the calling thread; the
// experts run in two fork-joins over output rows on a small thread pool: first every selected
// expert's gate/up rows (split evenly over the threads), then the output columns (each thread
// owns whole columns of y, summing over the experts, so no atomics).
//
// The pool, not OpenMP: libgomp's waits spin without yielding, and on this shared 2-core VM a
// 2-thread OpenMP call took 13-16 ms instead of 0.25 ms whenever another process held a core
// (its spinning master starved the worker). Like TVM's pool, this one spins with
// sched_yield() and sleeps on a condition variable after kSpinSeconds idle.
//
// Built by bench_mixtral_block.py with: g++ -O3 -march=native -pthread -shared -fPIC.

#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr std::size_t kHugePage = 2u << 20;
constexpr int kTokenBlock = 4;  // tokens dotted with one weight row while it is in L1

float* alloc_huge(std::size_t count) {
  std::size_t bytes = (count * sizeof(float) + kHugePage - 1) / kHugePage * kHugePage;
  void* p = std::aligned_alloc(kHugePage, bytes);
  if (p != nullptr) madvise(p, bytes, MADV_HUGEPAGE);
  return static_cast<float*>(p);
}

constexpr double kSpinSeconds = 0.02;  // an idle worker yields this long, then sleeps

// Fork-join pool: run(job, arg) calls job(arg, i, n) on threads i = 0..n-1 (0 is the caller).
class Pool {
 public:
  using Job = void (*)(void* arg, int index, int count);

  explicit Pool(int threads) : count_(std::max(threads, 1)) {
    for (int i = 1; i < count_; ++i) workers_.emplace_back([this, i] { work(i); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (std::thread& w : workers_) w.join();
  }

  void run(Job job, void* arg) {
    job_ = job;
    arg_ = arg;
    pending_.store(count_ - 1);
    generation_.fetch_add(1);  // publishes job_ and arg_
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    job(arg, 0, count_);
    while (pending_.load() > 0) sched_yield();
  }

 private:
  void work(int index) {
    std::uint64_t seen = 0;
    for (;;) {
      const auto idle_since = std::chrono::steady_clock::now();
      while (generation_.load() == seen) {
        sched_yield();
        if (std::chrono::duration<double>(std::chrono::steady_clock::now() - idle_since).count() >
            kSpinSeconds) {
          std::unique_lock<std::mutex> lock(mutex_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          sleepers_.fetch_sub(1);
        }
      }
      seen = generation_.load();
      if (stop_) return;
      job_(arg_, index, count_);
      pending_.fetch_sub(1);
    }
  }

  const int count_;
  std::vector<std::thread> workers_;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> pending_{0}, sleepers_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  Job job_ = nullptr;
  void* arg_ = nullptr;
  bool stop_ = false;
};

// Rows [begin, end) of `rows` that part `index` of `count` equal parts takes.
inline void split(long rows, int index, int count, long& begin, long& end) {
  begin = rows * index / count;
  end = rows * (index + 1) / count;
}

struct Block {
  Block(int hidden_, int ffn_, int experts_, int top_k_, int threads)
      : hidden(hidden_), ffn(ffn_), experts(experts_), top_k(top_k_), pool(threads),
        router(static_cast<std::size_t>(experts_) * hidden_) {}

  int hidden, ffn, experts, top_k;
  Pool pool;
  std::vector<float> router;  // [E][H]
  float* gate = nullptr;      // [E][F][H]
  float* up = nullptr;        // [E][F][H]
  float* down = nullptr;      // [E][H][F]
  // Per call, reused: routing, grouping and the activations.
  std::vector<int> count, start, token;  // tokens of expert e: token[start[e] .. start[e]+count[e])
  std::vector<float> gain;               // routing weight of each (expert, token) pair, same order
  std::vector<int> active;               // experts with at least one token, ascending
  std::vector<float> act;                // [pairs][F]: SiLU(gate) * up per (expert, token) pair
  const float* x = nullptr;              // this call's input [tokens][H] and output
  float* y = nullptr;
  int tokens = 0;
};

// Eight floats as a GCC vector (any target GCC supports), loadable from unaligned memory.
typedef float v8 __attribute__((vector_size(32), aligned(4)));

// out[t] = row . rows[t] for N rows of length n (a multiple of 8 * U). U vector partial sums
// per row keep enough independent FMA chains in flight that the loop waits on memory.
template <int N, int U>
inline void dot_rows(const float* row, const float* const* rows, int n, float* out) {
  v8 acc[N][U] = {};
  for (int i = 0; i < n; i += 8 * U)
    for (int u = 0; u < U; ++u) {
      const v8 w = *reinterpret_cast<const v8*>(row + i + 8 * u);
      for (int t = 0; t < N; ++t) acc[t][u] += w * *reinterpret_cast<const v8*>(rows[t] + i + 8 * u);
    }
  for (int t = 0; t < N; ++t) {
    v8 sum = acc[t][0];
    for (int u = 1; u < U; ++u) sum += acc[t][u];
    out[t] = sum[0] + sum[1] + sum[2] + sum[3] + sum[4] + sum[5] + sum[6] + sum[7];
  }
}

// out[i] = row . rows[i] for count (1..kTokenBlock) rows of length n (a multiple of 32).
inline void dots(const float* row, const float* const* rows, int count, int n, float* out) {
  switch (count) {
    case 1: return dot_rows<1, 4>(row, rows, n, out);
    case 2: return dot_rows<2, 2>(row, rows, n, out);
    case 3: return dot_rows<3, 2>(row, rows, n, out);
    default: return dot_rows<4, 2>(row, rows, n, out);
  }
}

void route(Block& b, const float* x, int tokens) {
  const int E = b.experts, H = b.hidden, K = b.top_k;
  std::vector<float> prob(E);
  std::vector<int> chosen(static_cast<std::size_t>(tokens) * K);
  std::vector<float> weight(static_cast<std::size_t>(tokens) * K);
  b.count.assign(E, 0);
  for (int t = 0; t < tokens; ++t) {
    const float* xt = x + static_cast<std::size_t>(t) * H;
    float top = -INFINITY;
    for (int e = 0; e < E; ++e) {
      const float* r = &b.router[static_cast<std::size_t>(e) * H];
      float acc = 0.f;
      for (int i = 0; i < H; ++i) acc += xt[i] * r[i];
      prob[e] = acc;
      top = std::max(top, acc);
    }
    float sum = 0.f;
    for (int e = 0; e < E; ++e) sum += prob[e] = std::exp(prob[e] - top);
    float kept = 0.f;
    for (int k = 0; k < K; ++k) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        bool taken = false;
        for (int j = 0; j < k; ++j) taken |= chosen[t * K + j] == e;
        if (!taken && (best < 0 || prob[e] > prob[best])) best = e;
      }
      chosen[t * K + k] = best;
      weight[t * K + k] = prob[best] / sum;
      kept += weight[t * K + k];
      ++b.count[best];
    }
    for (int k = 0; k < K; ++k) weight[t * K + k] /= kept;
  }
  b.start.assign(E, 0);
  b.active.clear();
  for (int e = 0, s = 0; e < E; ++e) {
    b.start[e] = s;
    s += b.count[e];
    if (b.count[e] > 0) b.active.push_back(e);
  }
  b.token.resize(static_cast<std::size_t>(tokens) * K);
  b.gain.resize(static_cast<std::size_t>(tokens) * K);
  std::vector<int> fill(b.start);
  for (int t = 0; t < tokens; ++t) {
    for (int k = 0; k < K; ++k) {
      int slot = fill[chosen[t * K + k]]++;
      b.token[slot] = t;
      b.gain[slot] = weight[t * K + k];
    }
  }
}

// Phase 1, on thread `index` of `count`: its share of the selected experts' gate/up rows,
// each row dotted with all of its expert's tokens while it is in L1.
void gate_up(void* arg, int index, int count) {
  Block& b = *static_cast<Block*>(arg);
  const int H = b.hidden, F = b.ffn;
  const float* in[kTokenBlock];
  float g[kTokenBlock], u[kTokenBlock];
  long begin, end;
  split(static_cast<long>(b.active.size()) * F, index, count, begin, end);
  for (long r = begin; r < end; ++r) {
    const int e = b.active[r / F];
    const int f = static_cast<int>(r % F);
    const std::size_t row = (static_cast<std::size_t>(e) * F + f) * H;
    for (int p = b.start[e], last = p + b.count[e]; p < last; p += kTokenBlock) {
      const int n = std::min(kTokenBlock, last - p);
      for (int i = 0; i < n; ++i) in[i] = b.x + static_cast<std::size_t>(b.token[p + i]) * H;
      dots(b.gate + row, in, n, H, g);
      dots(b.up + row, in, n, H, u);
      for (int i = 0; i < n; ++i)
        b.act[static_cast<std::size_t>(p + i) * F + f] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  }
}

// Phase 2, on thread `index` of `count`: whole output columns, summed over the experts.
void down(void* arg, int index, int count) {
  Block& b = *static_cast<Block*>(arg);
  const int H = b.hidden, F = b.ffn;
  const float* in[kTokenBlock];
  float d[kTokenBlock];
  long begin, end;
  split(H, index, count, begin, end);
  for (long j = begin; j < end; ++j) {
    for (int t = 0; t < b.tokens; ++t) b.y[static_cast<std::size_t>(t) * H + j] = 0.f;
    for (int e : b.active) {
      const float* row = b.down + (static_cast<std::size_t>(e) * H + j) * F;
      for (int p = b.start[e], last = p + b.count[e]; p < last; p += kTokenBlock) {
        const int n = std::min(kTokenBlock, last - p);
        for (int i = 0; i < n; ++i) in[i] = &b.act[static_cast<std::size_t>(p + i) * F];
        dots(row, in, n, F, d);
        for (int i = 0; i < n; ++i) b.y[static_cast<std::size_t>(b.token[p + i]) * H + j] += b.gain[p + i] * d[i];
      }
    }
  }
}

}  // namespace

extern "C" {

// Copies the weights (numpy layouts: router [H][E], gate/up [E][H][F], down [E][F][H]) into the
// block's own layout. Returns nullptr if memory runs out.
void* cloop_create(const float* router, const float* gate, const float* up, const float* down, int hidden,
                   int ffn, int experts, int top_k, int threads) {
  const std::size_t H = hidden, F = ffn, E = experts;
  Block* b = new Block(hidden, ffn, experts, top_k, threads);
  b->gate = alloc_huge(E * F * H);
  b->up = alloc_huge(E * F * H);
  b->down = alloc_huge(E * H * F);
  if (b->gate == nullptr || b->up == nullptr || b->down == nullptr) {
    std::free(b->gate), std::free(b->up), std::free(b->down);
    delete b;
    return nullptr;
  }
  for (std::size_t h = 0; h < H; ++h)
    for (std::size_t e = 0; e < E; ++e) b->router[e * H + h] = router[h * E + e];
  for (std::size_t e = 0; e < E; ++e)
    for (std::size_t h = 0; h < H; ++h)
      for (std::size_t f = 0; f < F; ++f) {
        b->gate[(e * F + f) * H + h] = gate[(e * H + h) * F + f];
        b->up[(e * F + f) * H + h] = up[(e * H + h) * F + f];
        b->down[(e * H + h) * F + f] = down[(e * F + f) * H + h];
      }
  return b;
}

// y[tokens][H] = the block applied to x[tokens][H].
void cloop_run(void* block, const float* x, int tokens, float* y) {
  Block& b = *static_cast<Block*>(block);
  route(b, x, tokens);
  b.x = x;
  b.y = y;
  b.tokens = tokens;
  b.act.resize(static_cast<std::size_t>(tokens) * b.top_k * b.ffn);
  b.pool.run(gate_up, &b);
  b.pool.run(down, &b);
}

void cloop_destroy(void* block) {
  Block* b = static_cast<Block*>(block);
  std::free(b->gate), std::free(b->up), std::free(b->down);
  delete b;
}
}
