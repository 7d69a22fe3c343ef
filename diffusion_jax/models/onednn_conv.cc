// oneDNN convolutions (NHWC activations, HWIO kernels, float32) as XLA FFI handlers:
// the forward convolution, its input gradient and its weight gradient, each a oneDNN
// primitive built once per shape (and thread count) and cached. Compiled and registered
// on first use by diffusion_jax/models/onednn.py (see there for why and how it is used).
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <unordered_map>
#include <memory>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

// GNU OpenMP, which libdnnl.so.3 (the GOMP build) loads: declared rather than included,
// so that neither <omp.h> nor -fopenmp is needed (with clang, -fopenmp would bring
// LLVM's runtime, whose settings oneDNN's threads would never see).
extern "C" {
void omp_set_num_threads(int);
int omp_get_max_threads(void);
}

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Every primitive gets its scratch memory from the caller, per call: a cached primitive
// is run by several XLA threads at once, and with oneDNN's own (library-managed)
// scratchpad those calls would share one buffer and corrupt each other's results.
const dnnl::primitive_attr& UserScratchpad() {
  static const dnnl::primitive_attr* attr = [] {
    auto* a = new dnnl::primitive_attr();
    a->set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return a;
  }();
  return *attr;
}

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, plh, phh, plw, phw;
  // OpenMP threads of the call: a primitive fixes its work split when it is created,
  // so the count is part of the cache key.
  int64_t threads;
  std::string Key(char kind) const {
    std::string k(1, kind);
    for (int64_t v : {n, h, w, c, kh, kw, o, oh, ow, sh, sw, plh, phh, plw, phw, threads}) {
      k += ',';
      k += std::to_string(v);
    }
    return k;
  }
  memory::desc Src() const { return {{n, c, h, w}, memory::data_type::f32, memory::format_tag::nhwc}; }
  memory::desc Dst() const { return {{n, o, oh, ow}, memory::data_type::f32, memory::format_tag::nhwc}; }
  memory::desc WeiUser() const { return {{o, c, kh, kw}, memory::data_type::f32, memory::format_tag::hwio}; }
  memory::desc WeiAny() const { return {{o, c, kh, kw}, memory::data_type::f32, memory::format_tag::any}; }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadL() const { return {plh, plw}; }
  memory::dims PadR() const { return {phh, phw}; }
  dnnl::convolution_forward::primitive_desc Forward() const {
    return dnnl::convolution_forward::primitive_desc(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, Src(),
        WeiAny(), Dst(), Strides(), PadL(), PadR(), UserScratchpad());
  }
};

// A primitive with the weight layout it chose ('any'), and the reorders between that
// layout and the caller's HWIO when they differ.
struct Cached {
  dnnl::primitive prim;
  memory::desc wei, scratch;
  dnnl::reorder to_prim, from_prim;
  memory::desc to_scratch, from_scratch;
  bool reorder = false;
};

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<Cached>>& Cache() {
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Cached>>();
  return *cache;
}

template <typename Make>
std::shared_ptr<Cached> Get(const std::string& key, Make make) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = Cache().find(key);
  if (it != Cache().end()) return it->second;
  auto entry = std::make_shared<Cached>(make());
  Cache()[key] = entry;
  return entry;
}

// The OpenMP threads of one call: OpenMP keeps the count per calling thread, so it is set
// for the call and the caller's own count restored after it (threads of XLA's pool serve
// programs that want different counts, and the caller may use OpenMP itself).
class CallThreads {
 public:
  explicit CallThreads(int64_t threads) : saved_(omp_get_max_threads()) {
    omp_set_num_threads(static_cast<int>(threads > 0 ? threads : 1));
  }
  ~CallThreads() { omp_set_num_threads(saved_); }
  CallThreads(const CallThreads&) = delete;
  CallThreads& operator=(const CallThreads&) = delete;

 private:
  int saved_;
};

Geometry MakeGeometry(ffi::AnyBuffer::Dimensions xd, int64_t kh, int64_t kw, int64_t o,
                      ffi::AnyBuffer::Dimensions yd, int64_t sh, int64_t sw, int64_t plh,
                      int64_t phh, int64_t plw, int64_t phw) {
  return Geometry{xd[0], xd[1], xd[2], xd[3], kh, kw, o, yd[1], yd[2], sh, sw,
                  plh, phh, plw, phw, omp_get_max_threads()};
}

template <typename PrimitiveDesc>
Cached WithWeights(dnnl::primitive prim, const PrimitiveDesc& pd, const memory::desc& wei,
                   const Geometry& g) {
  Cached c;
  c.prim = prim;
  c.wei = wei;
  c.scratch = pd.scratchpad_desc();
  c.reorder = wei != g.WeiUser();
  if (c.reorder) {
    auto to_pd = dnnl::reorder::primitive_desc(Engine(), g.WeiUser(), Engine(), wei,
                                               UserScratchpad());
    auto from_pd = dnnl::reorder::primitive_desc(Engine(), wei, Engine(), g.WeiUser(),
                                                 UserScratchpad());
    c.to_prim = dnnl::reorder(to_pd);
    c.from_prim = dnnl::reorder(from_pd);
    c.to_scratch = to_pd.scratchpad_desc();
    c.from_scratch = from_pd.scratchpad_desc();
  }
  return c;
}

// Runs a cached reorder with scratch memory of its own.
void Reorder(const dnnl::reorder& r, const memory::desc& scratch, dnnl::stream& stream,
             memory& from, memory& to) {
  memory scratchpad(scratch, Engine());
  r.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
}

// The weights as the primitive reads them: the caller's HWIO buffer, or a reorder of it
// into the primitive's own layout.
memory PrimitiveWeights(const Cached& c, dnnl::stream& stream, memory& wei_user) {
  if (!c.reorder) return wei_user;
  memory wei(c.wei, Engine());
  Reorder(c.to_prim, c.to_scratch, stream, wei_user, wei);
  return wei;
}

ffi::Error Guard(const std::function<void()>& body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t plh,
                           int64_t phh, int64_t plw, int64_t phw, int64_t threads) {
  auto wd = w.dimensions();
  CallThreads call_threads(threads);
  Geometry g = MakeGeometry(x.dimensions(), wd[0], wd[1], wd[3], y->dimensions(), sh, sw, plh,
                            phh, plw, phw);
  return Guard([&] {
    auto c = Get(g.Key('f'), [&] {
      auto pd = g.Forward();
      return WithWeights(dnnl::convolution_forward(pd), pd, pd.weights_desc(), g);
    });
    dnnl::stream stream(Engine());
    memory src(g.Src(), Engine(), x.typed_data());
    memory wei_user(g.WeiUser(), Engine(), w.typed_data());
    memory dst(g.Dst(), Engine(), y->typed_data());
    memory wei = PrimitiveWeights(*c, stream, wei_user);
    memory scratchpad(c->scratch, Engine());
    c->prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst},
                             {DNNL_ARG_SCRATCHPAD, scratchpad}});
    stream.wait();
  });
}

ffi::Error ConvBackwardDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                                ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw,
                                int64_t plh, int64_t phh, int64_t plw, int64_t phw,
                                int64_t threads) {
  auto wd = w.dimensions();
  CallThreads call_threads(threads);
  Geometry g = MakeGeometry(dx->dimensions(), wd[0], wd[1], wd[3], dy.dimensions(), sh, sw, plh,
                            phh, plw, phw);
  return Guard([&] {
    auto c = Get(g.Key('d'), [&] {
      auto pd = dnnl::convolution_backward_data::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.WeiAny(), g.Dst(),
          g.Strides(), g.PadL(), g.PadR(), g.Forward(), UserScratchpad());
      return WithWeights(dnnl::convolution_backward_data(pd), pd, pd.weights_desc(), g);
    });
    dnnl::stream stream(Engine());
    memory diff_src(g.Src(), Engine(), dx->typed_data());
    memory wei_user(g.WeiUser(), Engine(), w.typed_data());
    memory diff_dst(g.Dst(), Engine(), dy.typed_data());
    memory wei = PrimitiveWeights(*c, stream, wei_user);
    memory scratchpad(c->scratch, Engine());
    c->prim.execute(stream, {{DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_WEIGHTS, wei},
                             {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    stream.wait();
  });
}

ffi::Error ConvBackwardWeightsImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                   ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                                   int64_t plh, int64_t phh, int64_t plw, int64_t phw,
                                int64_t threads) {
  auto wd = dw->dimensions();
  CallThreads call_threads(threads);
  Geometry g = MakeGeometry(x.dimensions(), wd[0], wd[1], wd[3], dy.dimensions(), sh, sw, plh,
                            phh, plw, phw);
  return Guard([&] {
    auto c = Get(g.Key('w'), [&] {
      auto pd = dnnl::convolution_backward_weights::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, g.Src(), g.WeiAny(), g.Dst(),
          g.Strides(), g.PadL(), g.PadR(), g.Forward(), UserScratchpad());
      return WithWeights(dnnl::convolution_backward_weights(pd), pd, pd.diff_weights_desc(), g);
    });
    dnnl::stream stream(Engine());
    memory src(g.Src(), Engine(), x.typed_data());
    memory diff_dst(g.Dst(), Engine(), dy.typed_data());
    memory wei_user(g.WeiUser(), Engine(), dw->typed_data());
    memory wei = c->reorder ? memory(c->wei, Engine()) : wei_user;
    memory scratchpad(c->scratch, Engine());
    c->prim.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, wei},
                             {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (c->reorder) Reorder(c->from_prim, c->from_scratch, stream, wei, wei_user);
    stream.wait();
  });
}

}  // namespace

#define DJ_CONV_ATTRS                                                                 \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_lo_h")     \
      .Attr<int64_t>("pad_hi_h").Attr<int64_t>("pad_lo_w").Attr<int64_t>("pad_hi_w")    \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() DJ_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DjConvBackwardData, ConvBackwardDataImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() DJ_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DjConvBackwardWeights, ConvBackwardWeightsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() DJ_CONV_ATTRS);
