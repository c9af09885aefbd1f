// y = x @ W for a CSR matrix W.T (one row per output feature) and a dense row-major x, as an XLA
// FFI custom call for the CPU. Built and loaded by jaxprune/_native.py; see its docstring.
//
// Operands: indptr (int32, N + 1), indices (int32 or uint16, nnz; input positions, in range by
// construction of the layout), values (float32, nnz), x (float32, (..., K)). Result: (..., N).
// Any leading axes of x are rows of the batch. Rows are taken in tiles of at most 8: a tile of x
// is transposed to (K, tile) so that each kept weight reads its tile of inputs contiguously.
// Large products are split over XLA's intra-op thread pool by output features, balanced by
// kept count; the calling thread works too, so the call never waits on a task that has not
// started.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 8;
// Below this many multiply-adds a call runs on one thread: scheduling costs a few microseconds.
constexpr int64_t kParallelWork = int64_t{1} << 18;

template <typename Idx, int TB>
void TileRange(const int32_t* indptr, const Idx* idx, const float* val, const float* xt,
               float* y, int64_t n_out, int64_t j0, int64_t j1) {
  // xt: (K, TB) inputs of this tile; y: the tile's first output row, row stride n_out.
  for (int64_t j = j0; j < j1; ++j) {
    const int32_t lo = indptr[j], hi = indptr[j + 1];
    if constexpr (TB == 1) {
      // Four partial sums: the loads are independent, one chain would serialise on the adds.
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      int32_t p = lo;
      for (; p + 4 <= hi; p += 4) {
        s0 += val[p] * xt[idx[p]];
        s1 += val[p + 1] * xt[idx[p + 1]];
        s2 += val[p + 2] * xt[idx[p + 2]];
        s3 += val[p + 3] * xt[idx[p + 3]];
      }
      for (; p < hi; ++p) s0 += val[p] * xt[idx[p]];
      y[j] = (s0 + s1) + (s2 + s3);
    } else {
      float acc[TB] = {};
      for (int32_t p = lo; p < hi; ++p) {
        const float w = val[p];
        const float* xr = xt + static_cast<int64_t>(idx[p]) * TB;
        for (int b = 0; b < TB; ++b) acc[b] += w * xr[b];
      }
      for (int b = 0; b < TB; ++b) y[b * n_out + j] = acc[b];
    }
  }
}

template <typename Idx>
void Tile(int tb, const int32_t* indptr, const Idx* idx, const float* val, const float* xt,
          float* y, int64_t n_out, int64_t j0, int64_t j1) {
  switch (tb) {
#define JAXPRUNE_TILE(n) \
  case n:                \
    return TileRange<Idx, n>(indptr, idx, val, xt, y, n_out, j0, j1);
    JAXPRUNE_TILE(1)
    JAXPRUNE_TILE(2)
    JAXPRUNE_TILE(3)
    JAXPRUNE_TILE(4)
    JAXPRUNE_TILE(5)
    JAXPRUNE_TILE(6)
    JAXPRUNE_TILE(7)
    JAXPRUNE_TILE(8)
#undef JAXPRUNE_TILE
  }
}

// Work shared by the calling thread and the pool's tasks: chunks of output features, taken in
// turn from an atomic counter until none is left.
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename Idx>
constexpr ffi::DataType kIdxType = sizeof(Idx) == 2 ? ffi::DataType::U16 : ffi::DataType::S32;

template <typename Idx>
ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> indptr_buf, ffi::AnyBuffer idx_buf,
               ffi::Buffer<ffi::F32> val_buf, ffi::Buffer<ffi::F32> x_buf,
               ffi::ResultBuffer<ffi::F32> y_buf) {
  const auto x_dims = x_buf.dimensions();
  const auto y_dims = y_buf->dimensions();
  if (x_dims.size() < 1 || y_dims.size() != x_dims.size()) {
    return ffi::Error::InvalidArgument("csr_matmul: x must have at least one axis");
  }
  if (idx_buf.element_type() != kIdxType<Idx>) {
    return ffi::Error::InvalidArgument("csr_matmul: wrong index dtype for this target");
  }
  const int64_t k_in = x_dims.back();
  const int64_t n_out = y_dims.back();
  const int64_t rows = n_out == 0 ? 0 : static_cast<int64_t>(y_buf->element_count()) / n_out;
  if (static_cast<int64_t>(x_buf.element_count()) != rows * k_in) {
    return ffi::Error::InvalidArgument("csr_matmul: x and the result disagree on the rows");
  }
  if (static_cast<int64_t>(indptr_buf.element_count()) != n_out + 1) {
    return ffi::Error::InvalidArgument(
        "csr_matmul: indptr must hold N + 1 entries (a layout batched under vmap is not "
        "supported)");
  }
  const int32_t* indptr = indptr_buf.typed_data();
  const int64_t nnz = static_cast<int64_t>(val_buf.element_count());
  if (static_cast<int64_t>(idx_buf.element_count()) != nnz || indptr[n_out] > nnz) {
    return ffi::Error::InvalidArgument("csr_matmul: indices, values and indptr disagree");
  }
  const Idx* idx = idx_buf.reinterpret_data<Idx>();
  const float* val = val_buf.typed_data();
  const float* x = x_buf.typed_data();
  float* y = y_buf->typed_data();
  if (rows == 0 || n_out == 0) return ffi::Error::Success();

  // x transposed tile by tile: (n_tiles, K, tile), the last tile possibly shorter.
  std::vector<float> xt_store;
  const float* xt = x;
  if (rows > 1) {
    xt_store.resize(static_cast<size_t>(rows * k_in));
    for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
      const int64_t tb = std::min(kTile, rows - r0);
      float* dst = xt_store.data() + r0 * k_in;
      for (int64_t b = 0; b < tb; ++b) {
        const float* src = x + (r0 + b) * k_in;
        for (int64_t k = 0; k < k_in; ++k) dst[k * tb + b] = src[k];
      }
    }
    xt = xt_store.data();
  }
  auto do_range = [&](int64_t j0, int64_t j1) {
    for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
      const int tb = static_cast<int>(std::min(kTile, rows - r0));
      Tile<Idx>(tb, indptr, idx, val, xt + r0 * k_in, y + r0 * n_out, n_out, j0, j1);
    }
  };

  const int64_t threads = pool.num_threads();
  const int64_t work = static_cast<int64_t>(indptr[n_out]) * rows;
  if (threads < 2 || work < kParallelWork) {
    do_range(0, n_out);
    return ffi::Error::Success();
  }
  // Chunk bounds at equal shares of the kept entries, a few chunks per thread.
  const int64_t n_chunks = std::min<int64_t>(n_out, 4 * (threads + 1));
  std::vector<int64_t> bounds(n_chunks + 1, n_out);
  bounds[0] = 0;
  for (int64_t c = 1; c < n_chunks; ++c) {
    const int64_t target = indptr[n_out] * c / n_chunks;
    bounds[c] = std::lower_bound(indptr, indptr + n_out, target) - indptr;
  }
  auto shared = std::make_shared<Shared>();
  // A task that starts after the last chunk is taken touches only `shared`, which it co-owns:
  // the references to this frame are used only while a chunk is pending, so while we wait.
  auto worker = [shared, &bounds, &do_range, n_chunks]() {
    for (int64_t c; (c = shared->next.fetch_add(1)) < n_chunks;) {
      do_range(bounds[c], bounds[c + 1]);
      if (shared->done.fetch_add(1) + 1 == n_chunks) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(threads, n_chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = worker;
    pool.Schedule(std::move(task));
  }
  worker();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == n_chunks; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpruneCsrMatmulI32, Run<int32_t>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpruneCsrMatmulU16, Run<uint16_t>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
