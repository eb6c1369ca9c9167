// PyTorch's distributed engine (c10d) as a few C functions for src/dist/: a TCPStore for
// rendezvous, a Gloo (CPU) or NCCL (CUDA, feature `nccl`) process group, and the
// collectives data-parallel training needs. Everything here calls code that ships compiled in
// the torch wheel's libtorch_cpu.so / libtorch_cuda.so.
//
// Exceptions never cross into Rust: every entry point catches and stores the message for
// gmpq_dist_last_error() (thread-local), returning NULL or -1.

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef GMPQ_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <c10/util/Logging.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

thread_local std::string last_error;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

// The first line of a c10d message (the rest is a C++ stack trace).
void remember(const std::exception& e) {
  std::string msg = e.what();
  auto nl = msg.find('\n');
  last_error = nl == std::string::npos ? msg : msg.substr(0, nl);
}

int run(c10::intrusive_ptr<c10d::Work> work) {
  work->wait();
  return 0;
}

}  // namespace

extern "C" {

// Joins (or, with `host_store`, hosts) the TCPStore at host:port, then creates the process
// group of `world` ranks under `prefix`. `timeout_ms` bounds the store connection, the
// rendezvous and every collective.
void* gmpq_dist_new(const char* host, int port, int host_store, const char* prefix, int rank,
                    int world, int64_t timeout_ms, int nccl) {
  try {
    // c10d's own warnings (a socket retry, a rendezvous wait) repeat what the error this call
    // returns says; TORCH_CPP_LOG_LEVEL brings them back.
    if (std::getenv("TORCH_CPP_LOG_LEVEL") == nullptr && FLAGS_caffe2_log_level < 2) {
      FLAGS_caffe2_log_level = 2;
    }
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = host_store != 0;
    opts.numWorkers = world;
    opts.waitWorkers = false;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto group = new Group{store, {}};
    if (nccl != 0) {
#ifdef GMPQ_NCCL
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = timeout;
      group->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, o);
#else
      delete group;
      last_error = "this gmpq was built without the `nccl` feature";
      return nullptr;
#endif
    } else {
      auto o = c10d::ProcessGroupGloo::Options::create_default(timeout);
      o->timeout = timeout;
      o->threads = 1;
      group->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, o);
    }
    return group;
  } catch (const std::exception& e) {
    remember(e);
    return nullptr;
  }
}

// op: 0 sum, 1 max.
int gmpq_dist_all_reduce(void* g, const at::Tensor* t, int op) {
  try {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp(c10d::ReduceOp::MAX) : c10d::ReduceOp(c10d::ReduceOp::SUM);
    return run(static_cast<Group*>(g)->backend->allreduce(ts, o));
  } catch (const std::exception& e) {
    remember(e);
    return -1;
  }
}

int gmpq_dist_broadcast(void* g, const at::Tensor* t, int root) {
  try {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    return run(static_cast<Group*>(g)->backend->broadcast(ts, o));
  } catch (const std::exception& e) {
    remember(e);
    return -1;
  }
}

int gmpq_dist_barrier(void* g) {
  try {
    return run(static_cast<Group*>(g)->backend->barrier());
  } catch (const std::exception& e) {
    remember(e);
    return -1;
  }
}

void gmpq_dist_free(void* g) {
  try {
    delete static_cast<Group*>(g);
  } catch (...) {
  }
}

const char* gmpq_dist_last_error() { return last_error.c_str(); }

}  // extern "C"
