// neox_l2e.kernels._sample_index: the two sequential index builders of the data pipeline, in C++.
//
// build_sample_idx: where each training sample starts in the epoch's document order.
//   Samples are windows of seq_length + 1 tokens packed across documents; sample i covers the global
//   token positions i*seq_length .. i*seq_length + seq_length of the concatenated documents
//   doc_idx[0], doc_idx[1], ... (consecutive samples share one token: the last target of one is the
//   first input of the next, as in Megatron / GPT-NeoX).
//   Row i of the result is (k, offset) for global position p = i*seq_length, where k is the largest
//   index with start(k) <= p (start(k) = tokens before document doc_idx[k]) and offset = p - start(k).
//   Empty documents are skipped. Row num_samples is the end of the last sample.
//   neox_l2e/data/sample_index.py holds the numpy version, which must give identical arrays.
//
// build_blending_indices: for blended datasets, sample i goes to the dataset whose share is furthest
//   behind its weight (largest weight[d] * (i + 1) - taken[d], first one on ties).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

static py::array_t<int64_t> build_sample_idx(py::array_t<int32_t, py::array::c_style | py::array::forcecast> sizes,
                                            py::array_t<int64_t, py::array::c_style | py::array::forcecast> doc_idx,
                                            int64_t seq_length, int64_t num_samples) {
  if (seq_length <= 0) throw std::invalid_argument("seq_length must be positive");
  if (num_samples < 0) throw std::invalid_argument("num_samples must be >= 0");
  auto s = sizes.unchecked<1>();
  auto d = doc_idx.unchecked<1>();
  const int64_t n_docs = d.shape(0);
  for (int64_t k = 0; k < n_docs; ++k)
    if (d(k) < 0 || d(k) >= s.shape(0)) throw std::out_of_range("doc_idx entry outside sizes");

  py::array_t<int64_t> out({num_samples + 1, (int64_t)2});
  auto o = out.mutable_unchecked<2>();
  {
    py::gil_scoped_release release;
    int64_t k = 0;      // current position in doc_idx
    int64_t start = 0;  // global token position where document doc_idx[k] starts
    bool overflow = false;
    for (int64_t i = 0; i <= num_samples && !overflow; ++i) {
      const int64_t p = i * seq_length;
      // advance while document k ends at or before p (this also skips empty documents)
      while (k < n_docs && start + s(d(k)) <= p) {
        start += s(d(k));
        ++k;
      }
      if (k >= n_docs) {
        overflow = true;
        break;
      }
      o(i, 0) = k;
      o(i, 1) = p - start;
    }
    if (overflow) {
      py::gil_scoped_acquire acquire;
      throw std::out_of_range("not enough tokens in doc_idx for num_samples");
    }
  }
  return out;
}

static py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights,
                                        int64_t num_samples) {
  auto w = weights.unchecked<1>();
  const int64_t n = w.shape(0);
  if (n <= 0) throw std::invalid_argument("need at least one weight");
  py::array_t<int16_t> dataset_index(num_samples);
  py::array_t<int64_t> dataset_sample_index(num_samples);
  auto di = dataset_index.mutable_unchecked<1>();
  auto dsi = dataset_sample_index.mutable_unchecked<1>();
  std::vector<int64_t> taken(n, 0);
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < num_samples; ++i) {
      int64_t best = 0;
      double best_err = w(0) * (double)(i + 1) - (double)taken[0];
      for (int64_t j = 1; j < n; ++j) {
        const double err = w(j) * (double)(i + 1) - (double)taken[j];
        if (err > best_err) {
          best_err = err;
          best = j;
        }
      }
      di(i) = (int16_t)best;
      dsi(i) = taken[best];
      ++taken[best];
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

PYBIND11_MODULE(_sample_index, m) {
  m.doc() = "C++ builders of the sample index and blending indices (numpy versions in neox_l2e.data.sample_index)";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_samples"),
        "int64 [num_samples + 1, 2] rows (index into doc_idx, token offset) of each sample start");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("num_samples"),
        "(int16 dataset index, int64 sample index within that dataset) for each blended sample");
}
