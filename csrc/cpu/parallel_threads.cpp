// parallel_threads(): how many threads the C++ CPU kernels' at::parallel_for really runs on. ATen's
// parallel_for is inlined from its headers; an extension compiled without OpenMP (setup.py: -fopenmp) gets a
// serial loop there whatever torch.set_num_threads says, so this counts the distinct thread ids one call uses.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>
#include <set>

namespace amfor {
namespace {

int64_t parallel_threads() {
  const int64_t n = at::get_num_threads();
  std::mutex lock;
  std::set<int> ids;
  at::parallel_for(0, 64 * n, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> guard(lock);
    ids.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(ids.size());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amfor, m) {
  // the number of threads one at::parallel_for of the CPU kernels uses (1 in a build without OpenMP)
  m.def("parallel_threads() -> int", &parallel_threads);
}

}  // namespace amfor
