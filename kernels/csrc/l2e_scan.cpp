// neox_l2e.kernels._l2e_scan: the CPU sweep of the L2E torch path (neox_l2e.l2e.functional.scan) in one pass.
//
// scan(z [T, N] fp32, mean [N] fp32, inv_var [N] fp32, bound, threads)
//   -> (s1 [N] fp64, s2 [N] fp64, idx [K] int64, d [K] fp32, phi [K] fp32)
//
//   d = z - mean, phi = d * d * inv_var (fp32, operation by operation: the bits of functional.phi)
//   s1 = column sums of d, s2 = column sums of d * d (fp32 within a chunk of CHUNK_ROWS rows, fp64 across chunks)
//   idx = the flat row-major positions where phi >= bound (ascending), with their d and phi
//
// The rows are cut into fixed chunks of CHUNK_ROWS; a chunk's column sums and candidates are its own, and are
// merged in chunk order, so every output is the same whatever the number of threads. The torch version of the
// same sweep (functional._scan_blocks) is the reference the tests compare this with.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t CHUNK_ROWS = 32;

struct Chunk {
  std::vector<float> s1, s2;
  std::vector<int64_t> idx;
  std::vector<float> d, phi;
};

// x86-64 with GCC or Clang: an AVX2 clone besides the baseline (SSE2) one, picked at load time by the CPU (the
// same results: no FMA contraction, IEEE operations one by one in both)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define L2E_SCAN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define L2E_SCAN_CLONES
#endif

L2E_SCAN_CLONES
void scan_chunk(const float* __restrict__ z, const float* __restrict__ mean, const float* __restrict__ inv_var,
                int64_t N, int64_t r0, int64_t r1, float bound, bool select, Chunk& out, std::vector<float>& buf) {
  // per chunk: fp32 column sums over its (at most CHUNK_ROWS) rows, then fp64 across chunks
  float* __restrict__ c1 = buf.data();
  float* __restrict__ c2 = c1 + N;
  float* __restrict__ dr = c2 + N;
  float* __restrict__ pr = dr + N;
  int32_t* __restrict__ cols = reinterpret_cast<int32_t*>(pr + N);
  uint8_t* __restrict__ hit = reinterpret_cast<uint8_t*>(cols + N + 1);
  std::fill(c1, c1 + 2 * N, 0.0f);
  for (int64_t t = r0; t < r1; ++t) {
    const float* __restrict__ zr = z + t * N;
    for (int64_t c = 0; c < N; ++c) {  // branch-free: vectorised by the compiler
      const float d = zr[c] - mean[c];
      const float d2 = d * d;
      const float p = d2 * inv_var[c];
      dr[c] = d;
      pr[c] = p;
      hit[c] = p >= bound;
      c1[c] += d;
      c2[c] += d2;
    }
    if (!select) continue;
    // the hit columns, compacted without branches, visiting only groups of 8 that hold one (most hold none)
    int64_t k = 0;
    int64_t c = 0;
    for (; c + 8 <= N; c += 8) {
      uint64_t word;
      std::memcpy(&word, hit + c, 8);
      if (word == 0) continue;
      for (int j = 0; j < 8; ++j) {
        cols[k] = static_cast<int32_t>(c + j);
        k += hit[c + j];
      }
    }
    for (; c < N; ++c) {
      cols[k] = static_cast<int32_t>(c);
      k += hit[c];
    }
    if (k == 0) continue;
    const int64_t base = t * N;
    const size_t at = out.idx.size();
    out.idx.resize(at + k);
    out.d.resize(at + k);
    out.phi.resize(at + k);
    for (int64_t i = 0; i < k; ++i) {
      out.idx[at + i] = base + cols[i];
      out.d[at + i] = dr[cols[i]];
      out.phi[at + i] = pr[cols[i]];
    }
  }
  out.s1.assign(c1, c1 + N);
  out.s2.assign(c2, c2 + N);
}

template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

py::tuple scan(Array<float> z, Array<float> mean, Array<float> inv_var, double bound, bool select, int threads) {
  if (z.ndim() != 2) throw std::invalid_argument("z must be [T, N]");
  const int64_t T = z.shape(0), N = z.shape(1);
  if (mean.ndim() != 1 || mean.shape(0) != N || inv_var.ndim() != 1 || inv_var.shape(0) != N)
    throw std::invalid_argument("mean and inv_var must be [N]");
  if (N > INT32_MAX) throw std::invalid_argument("rows longer than 2^31 - 1 entries are not supported");
  const float* zp = z.data();
  const float* mp = mean.data();
  const float* vp = inv_var.data();
  const int64_t n_chunks = (T + CHUNK_ROWS - 1) / CHUNK_ROWS;
  // an fp32 value (tau, a level, a phi) or inf: exact; anything beyond fp32's range selects nothing
  const float b = bound > std::numeric_limits<float>::max() ? std::numeric_limits<float>::infinity()
                                                           : static_cast<float>(std::max(bound, -1.0e38));
  std::vector<Chunk> chunks(static_cast<size_t>(n_chunks));
  // at least 4 chunks a thread (threads are started per call); the result does not depend on the count
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(threads, n_chunks / 4));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n_threads));
  {
    py::gil_scoped_release release;
    auto work = [&](int64_t first) {
      try {
        std::vector<float> buf(5 * N + (N + 3) / 4 + 4);  // column sums, d, phi, hit columns and flags of a row
        for (int64_t k = first; k < n_chunks; k += n_threads) {
          const int64_t r0 = k * CHUNK_ROWS, r1 = std::min(T, r0 + CHUNK_ROWS);
          scan_chunk(zp, mp, vp, N, r0, r1, b, select, chunks[k], buf);
        }
      } catch (...) {
        errors[first] = std::current_exception();  // rethrown below, after every thread is joined
      }
    };
    std::vector<std::thread> pool;
    for (int64_t i = 1; i < n_threads; ++i) {
      try {
        pool.emplace_back(work, i);
      } catch (...) {  // no thread to be had: do its chunks here
        work(i);
      }
    }
    work(0);
    for (auto& th : pool) th.join();
  }
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);  // bad_alloc -> MemoryError in Python, never std::terminate
  Array<double> s1(N), s2(N);
  double* a1 = s1.mutable_data();
  double* a2 = s2.mutable_data();
  std::fill(a1, a1 + N, 0.0);
  std::fill(a2, a2 + N, 0.0);
  size_t K = 0;
  for (const auto& ch : chunks) {  // chunk order: the same sums whatever the thread count
    for (int64_t c = 0; c < N; ++c) {
      a1[c] += static_cast<double>(ch.s1[c]);
      a2[c] += static_cast<double>(ch.s2[c]);
    }
    K += ch.idx.size();
  }
  Array<int64_t> idx(static_cast<py::ssize_t>(K));
  Array<float> d(static_cast<py::ssize_t>(K)), phi(static_cast<py::ssize_t>(K));
  int64_t* ip = idx.mutable_data();
  float* dp = d.mutable_data();
  float* pp = phi.mutable_data();
  for (const auto& ch : chunks) {
    std::copy(ch.idx.begin(), ch.idx.end(), ip);
    std::copy(ch.d.begin(), ch.d.end(), dp);
    std::copy(ch.phi.begin(), ch.phi.end(), pp);
    ip += ch.idx.size();
    dp += ch.d.size();
    pp += ch.phi.size();
  }
  return py::make_tuple(s1, s2, idx, d, phi);
}

}  // namespace

PYBIND11_MODULE(_l2e_scan, m) {
  m.doc() = "The L2E torch path's CPU sweep in C++ (torch version: neox_l2e.l2e.functional._scan_blocks)";
  m.def("scan", &scan, py::arg("z"), py::arg("mean"), py::arg("inv_var"), py::arg("bound"), py::arg("select"),
        py::arg("threads"),
        "(s1, s2, idx, d, phi): column sums of z - mean and (z - mean)^2 (fp64), and the flat positions where "
        "phi = (z - mean)^2 * inv_var >= bound with their z - mean and phi");
}
