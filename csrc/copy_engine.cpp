// Async copy engine for the activation runtime (CPU side).
//
// A fixed pool of worker threads executes three kinds of requests and hands back a Handle
// to wait on:
//   * file I/O: pwrite / pread of a tensor's bytes at a file offset (O_DIRECT through a
//     second descriptor when buffer address, offset and length are all aligned; a staged
//     write first copies an unaligned tensor into an aligned buffer so it qualifies);
//   * copy: any tensor into another of the same shape (memcpy when both are contiguous);
//   * gather / scatter of token slices: ranges [start, start+len) along one dim of a
//     contiguous tensor to / from a contiguous buffer holding the ranges back to back.
// Large requests are split into parts so several workers share one transfer. A failed part
// makes Handle.wait() raise with the request's label (the file path for I/O): no caller can
// read a buffer whose transfer failed. Workers never touch Python objects.

#include <ATen/WrapDimUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/utils/pybind.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

constexpr int kAbiVersion = 2;

struct Completion {
  std::mutex mu;
  std::condition_variable cv;
  int64_t pending = 0;
  int64_t nbytes = 0;
  std::string error;
  std::vector<at::Tensor> keep_alive;  // tensors a request reads or writes, until done

  // The last part to finish drops the tensors, so a source is freed as soon as it is
  // copied (its Python owner is usually gone; torch frees it without the GIL).
  void finish_part(const std::string& err) {
    std::vector<at::Tensor> release;
    std::lock_guard<std::mutex> lock(mu);
    if (!err.empty() && error.empty()) error = err;
    if (--pending == 0) {
      release.swap(keep_alive);
      cv.notify_all();
    }
  }
};

class Handle {
 public:
  explicit Handle(std::shared_ptr<Completion> c) : c_(std::move(c)) {}

  // Block (without the GIL) until every part finished; raise if one failed.
  void wait() {
    {
      pybind11::gil_scoped_release no_gil;
      std::unique_lock<std::mutex> lock(c_->mu);
      c_->cv.wait(lock, [this] { return c_->pending == 0; });
    }
    if (!c_->error.empty()) throw std::runtime_error(c_->error);
  }

  bool done() {
    std::lock_guard<std::mutex> lock(c_->mu);
    return c_->pending == 0;
  }

  int64_t nbytes() const { return c_->nbytes; }

 private:
  std::shared_ptr<Completion> c_;
};

std::string errno_message(const std::string& what, const std::string& label, int err) {
  return what + " failed on " + label + ": " + std::strerror(err) + " (errno " +
         std::to_string(err) + ")";
}

bool aligned(const void* ptr, int64_t offset, int64_t len, int64_t align) {
  return reinterpret_cast<uintptr_t>(ptr) % align == 0 && offset % align == 0 &&
         len % align == 0;
}

// pwrite/pread the whole range, retrying on EINTR and partial transfers. A read that hits
// end of file is an error (a truncated swap file must never yield stale or zero bytes).
std::string transfer(bool write, int fd, int direct_fd, int64_t align, char* buf,
                     int64_t offset, int64_t len, const std::string& label) {
  int use_fd = (direct_fd >= 0 && aligned(buf, offset, len, align)) ? direct_fd : fd;
  int64_t done = 0;
  while (done < len) {
    ssize_t n = write ? ::pwrite(use_fd, buf + done, len - done, offset + done)
                      : ::pread(use_fd, buf + done, len - done, offset + done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EINVAL && use_fd == direct_fd && fd >= 0) {
      use_fd = fd;  // the filesystem refused O_DIRECT for this request: buffered retry
      continue;
    }
    if (n < 0) return errno_message(write ? "pwrite" : "pread", label, errno);
    if (n == 0) {
      return std::string(write ? "pwrite wrote 0 bytes" : "pread hit end of file (truncated?)") +
             " on " + label + " at offset " + std::to_string(offset + done);
    }
    done += n;
  }
  return "";
}

class CopyEngine {
 public:
  CopyEngine(int64_t num_threads, int64_t chunk_bytes, int64_t direct_align)
      : chunk_bytes_(chunk_bytes), align_(direct_align) {
    TORCH_CHECK(num_threads >= 1, "num_threads must be >= 1, got ", num_threads);
    TORCH_CHECK(chunk_bytes >= direct_align && chunk_bytes % direct_align == 0,
                "chunk_bytes must be a positive multiple of direct_align");
    for (int64_t i = 0; i < num_threads; ++i) workers_.emplace_back([this] { run(); });
  }

  // Workers never take the GIL, so joining while holding it cannot deadlock.
  ~CopyEngine() { stop_and_join(); }

  // Finish queued requests, then stop the workers (called from Python: GIL released).
  void shutdown() {
    pybind11::gil_scoped_release no_gil;
    stop_and_join();
  }

  int64_t num_threads() const { return static_cast<int64_t>(workers_.size()); }

  Handle write_file(int64_t fd, int64_t direct_fd, int64_t offset, const at::Tensor& src,
                    const std::string& label) {
    return file_io(true, fd, direct_fd, offset, src, label);
  }

  // Write `src` (any alignment) through an aligned `staging` buffer of at least
  // round_up(src.nbytes, direct_align) bytes: each part is copied into staging, the tail is
  // zero-padded to the alignment, then written, so every write can take the O_DIRECT path.
  Handle write_file_staged(int64_t fd, int64_t direct_fd, int64_t offset, const at::Tensor& src,
                           const at::Tensor& staging, const std::string& label) {
    TORCH_CHECK(src.device().is_cpu() && src.is_contiguous() && staging.device().is_cpu() &&
                    staging.is_contiguous(),
                "staged write needs contiguous CPU tensors (", label, ")");
    const int64_t total = src.nbytes();
    const int64_t padded = (total + align_ - 1) / align_ * align_;
    TORCH_CHECK(static_cast<int64_t>(staging.nbytes()) >= padded,
                "staging buffer smaller than the aligned write (", label, ")");
    TORCH_CHECK(fd >= 0 && offset >= 0, "bad file descriptor or offset for ", label);
    auto c = make_completion({src, staging}, total);
    const char* s = static_cast<const char*>(src.data_ptr());
    char* st = static_cast<char*>(staging.data_ptr());
    int64_t align = align_;
    split(c, padded, [=](int64_t begin, int64_t len) {
      const int64_t copy_len = std::max<int64_t>(0, std::min(len, total - begin));
      if (copy_len > 0) std::memcpy(st + begin, s + begin, copy_len);
      if (copy_len < len) std::memset(st + begin + copy_len, 0, len - copy_len);
      return transfer(true, static_cast<int>(fd), static_cast<int>(direct_fd), align, st + begin,
                      offset + begin, len, label);
    });
    return Handle(c);
  }

  Handle read_file(int64_t fd, int64_t direct_fd, int64_t offset, const at::Tensor& dst,
                   const std::string& label) {
    return file_io(false, fd, direct_fd, offset, dst, label);
  }

  Handle copy(const at::Tensor& src, const at::Tensor& dst) {
    TORCH_CHECK(src.sizes() == dst.sizes() && src.dtype() == dst.dtype(),
                "copy: src and dst must have the same shape and dtype");
    TORCH_CHECK(src.device().is_cpu() && dst.device().is_cpu(), "copy: CPU tensors only");
    auto c = make_completion({src, dst}, src.nbytes());
    if (src.is_contiguous() && dst.is_contiguous()) {
      const char* s = static_cast<const char*>(src.data_ptr());
      char* d = static_cast<char*>(dst.data_ptr());
      split(c, src.nbytes(), [s, d](int64_t begin, int64_t len) {
        std::memcpy(d + begin, s + begin, len);
        return std::string();
      });
    } else {
      submit_parts(c, {[src, dst]() mutable {
        at::NoGradGuard no_grad;
        dst.copy_(src);
        return std::string();
      }});
    }
    return Handle(c);
  }

  // dst holds the ranges of src along `dim`, back to back (dst.size(dim) == sum of lengths).
  Handle gather(const at::Tensor& src, int64_t dim, const std::vector<int64_t>& starts,
                const std::vector<int64_t>& lengths, const at::Tensor& dst) {
    return slices(src, dim, starts, lengths, dst, /*to_buffer=*/true);
  }

  // The inverse of gather: write the back-to-back ranges of src into dst's ranges.
  Handle scatter(const at::Tensor& src, int64_t dim, const std::vector<int64_t>& starts,
                 const std::vector<int64_t>& lengths, const at::Tensor& dst) {
    return slices(dst, dim, starts, lengths, src, /*to_buffer=*/false);
  }

 private:
  using Part = std::function<std::string()>;

  std::shared_ptr<Completion> make_completion(std::vector<at::Tensor> keep, int64_t nbytes) {
    auto c = std::make_shared<Completion>();
    c->keep_alive = std::move(keep);
    c->nbytes = nbytes;
    return c;
  }

  void submit_parts(const std::shared_ptr<Completion>& c, std::vector<Part> parts) {
    if (parts.empty()) return;  // pending stays 0: already done
    {
      std::lock_guard<std::mutex> lock(mu_);
      TORCH_CHECK(!stopping_, "copy engine is shut down");
      c->pending = static_cast<int64_t>(parts.size());
      for (auto& p : parts) {
        queue_.emplace_back([c, p = std::move(p)]() { c->finish_part(p()); });
      }
    }
    cv_.notify_all();
  }

  // Split [0, total) into chunk_bytes_ parts, each run as body(begin, len).
  void split(const std::shared_ptr<Completion>& c, int64_t total,
             std::function<std::string(int64_t, int64_t)> body) {
    std::vector<Part> parts;
    for (int64_t begin = 0; begin < total; begin += chunk_bytes_) {
      int64_t len = std::min(chunk_bytes_, total - begin);
      parts.emplace_back([body, begin, len] { return body(begin, len); });
    }
    submit_parts(c, std::move(parts));
  }

  Handle file_io(bool write, int64_t fd, int64_t direct_fd, int64_t offset,
                 const at::Tensor& t, const std::string& label) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(),
                "file I/O needs a contiguous CPU tensor (", label, ")");
    TORCH_CHECK(fd >= 0 && offset >= 0, "bad file descriptor or offset for ", label);
    auto c = make_completion({t}, t.nbytes());
    char* base = static_cast<char*>(t.data_ptr());
    int64_t align = align_;
    split(c, t.nbytes(), [=](int64_t begin, int64_t len) {
      return transfer(write, static_cast<int>(fd), static_cast<int>(direct_fd), align,
                      base + begin, offset + begin, len, label);
    });
    return Handle(c);
  }

  Handle slices(const at::Tensor& full, int64_t dim, const std::vector<int64_t>& starts,
                const std::vector<int64_t>& lengths, const at::Tensor& buffer, bool to_buffer) {
    TORCH_CHECK(full.is_contiguous() && buffer.is_contiguous(),
                "gather/scatter need contiguous tensors");
    TORCH_CHECK(full.dtype() == buffer.dtype(), "gather/scatter: dtypes differ");
    TORCH_CHECK(starts.size() == lengths.size(), "starts and lengths differ in length");
    dim = at::maybe_wrap_dim(dim, full.dim());
    int64_t total = 0;
    for (size_t i = 0; i < starts.size(); ++i) {
      TORCH_CHECK(starts[i] >= 0 && lengths[i] >= 0 && starts[i] + lengths[i] <= full.size(dim),
                  "range ", i, " out of bounds for dim ", dim);
      total += lengths[i];
    }
    for (int64_t d = 0; d < full.dim(); ++d) {
      TORCH_CHECK(buffer.size(d) == (d == dim ? total : full.size(d)),
                  "buffer shape does not match the ranges");
    }
    int64_t outer = 1, inner = full.element_size();
    for (int64_t d = 0; d < dim; ++d) outer *= full.size(d);
    for (int64_t d = dim + 1; d < full.dim(); ++d) inner *= full.size(d);
    int64_t full_len = full.size(dim);
    char* f = static_cast<char*>(full.data_ptr());
    char* b = static_cast<char*>(buffer.data_ptr());
    auto c = make_completion({full, buffer}, total * outer * inner);
    auto starts_c = starts;
    auto lengths_c = lengths;
    std::vector<Part> parts;
    int64_t rows_per_part = std::max<int64_t>(1, chunk_bytes_ / std::max<int64_t>(1, total * inner));
    for (int64_t o0 = 0; o0 < outer; o0 += rows_per_part) {
      int64_t o1 = std::min(outer, o0 + rows_per_part);
      parts.emplace_back([=] {
        for (int64_t o = o0; o < o1; ++o) {
          int64_t cum = 0;
          for (size_t i = 0; i < starts_c.size(); ++i) {
            char* fp = f + (o * full_len + starts_c[i]) * inner;
            char* bp = b + (o * total + cum) * inner;
            size_t n = static_cast<size_t>(lengths_c[i] * inner);
            if (to_buffer) std::memcpy(bp, fp, n); else std::memcpy(fp, bp, n);
            cum += lengths_c[i];
          }
        }
        return std::string();
      });
    }
    submit_parts(c, std::move(parts));
    return Handle(c);
  }

  void stop_and_join() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }

  void run() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping and drained
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      job();
    }
  }

  int64_t chunk_bytes_;
  int64_t align_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace

#ifdef DISTTRAIN_WITH_CUDA
void bind_cuda(pybind11::module& m);  // csrc/copy_engine_cuda.cpp
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "disttrain async copy engine: thread pool for file I/O and token-slice copies";
  m.def("abi_version", [] { return kAbiVersion; });
#ifdef DISTTRAIN_WITH_CUDA
  bind_cuda(m);  // gather_d2h, scatter_h2d, pack_slices
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  pybind11::class_<Handle>(m, "Handle")
      .def("wait", &Handle::wait, "Block until done; raise RuntimeError if a part failed")
      .def("done", &Handle::done)
      .def_property_readonly("nbytes", &Handle::nbytes);
  pybind11::class_<CopyEngine>(m, "CopyEngine")
      .def(pybind11::init<int64_t, int64_t, int64_t>(), pybind11::arg("num_threads"),
           pybind11::arg("chunk_bytes"), pybind11::arg("direct_align"))
      .def_property_readonly("num_threads", &CopyEngine::num_threads)
      .def("write_file", &CopyEngine::write_file)
      .def("write_file_staged", &CopyEngine::write_file_staged)
      .def("read_file", &CopyEngine::read_file)
      .def("copy", &CopyEngine::copy)
      .def("gather", &CopyEngine::gather)
      .def("scatter", &CopyEngine::scatter)
      .def("shutdown", &CopyEngine::shutdown);
}
