// A CPU emulator for micromoe's CUDA kernels, so that CI, which has no GPU,
// runs the very kernel source and launch sequence the GPU runs.
//
// Built by micromoe::cuda::Emulator with the host C++ compiler (C++20,
// address and undefined-behaviour sanitizers on), one binary per weight type:
//     c++ -std=c++20 -DWTYPE=float -I<dir> emu.cpp  (emu.cpp includes kernels.cu)
// In a kernel with barriers (the table below says which), every CUDA thread
// of a block is an OS thread; __syncthreads is a barrier, and the emulator
// refuses a block whose threads reach different barriers (a __syncthreads in
// divergent code: undefined on a GPU). The others run their threads one
// after another on one OS thread (so the thread sanitizer sees no races
// between their threads: each writes only its own outputs). Blocks run one
// after another, so `__shared__` arrays are function-level statics.
// Floats follow IEEE single precision without contraction
// (-ffp-contract=off), as __fmul_rn / __fadd_rn / __fmaf_rn do on the GPU;
// only expf, erff and tanhf may differ from CUDA's in the last bits.
//
// Protocol on stdin / stdout, little-endian, one request then one reply:
//   'U' u64 bytes, data      upload          -> u32 buffer id
//   'A' u64 bytes            zeroed buffer   -> u32 id
//   'D' u32 id               download        -> u64 bytes, data
//   'F' u32 id               free            -> (nothing)
//   'L' u8 len, name, 3 u32 grid, 3 u32 block, u8 args, args: 'b' u32 id | 'i' i32
//                            launch          -> u8 0, or u8 1, u32 len, message
// Anything else, or a malformed request, ends the process with a message on
// stderr.

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

namespace emu {
// Why a barrier was reached: __syncthreads or the end of the kernel.
enum Arrival : unsigned char { Sync = 1, Exit = 2 };
struct Abort {};

struct Block;
static thread_local Block* current;
static thread_local unsigned lane;

// Runs once per barrier phase, after every thread has arrived.
struct OnPhase {
    Block* block;
    void operator()() noexcept;
};

struct Block {
    std::vector<Arrival> arrivals;
    std::string error;
    std::barrier<OnPhase> barrier;
    explicit Block(unsigned threads) : arrivals(threads), barrier(threads, OnPhase{this}) {}
    void check() {
        for (auto a : arrivals) {
            if (a != arrivals[0] && error.empty()) {
                error = "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
                        "): threads reached different barriers (__syncthreads in divergent code)";
            }
        }
    }
    void arrive(Arrival why) {
        arrivals[lane] = why;
        barrier.arrive_and_wait();
        if (!error.empty()) throw Abort{};
    }
};

void OnPhase::operator()() noexcept { block->check(); }

inline void sync() {
    // A kernel listed as barrier-free runs its threads one after another.
    if (!current) throw std::runtime_error("__syncthreads in a kernel the emulator lists as barrier-free");
    current->arrive(Sync);
}
}  // namespace emu

#define MICROMOE_EMULATOR
#define FMUL(a, b) ((a) * (b))
#define FADD(a, b) ((a) + (b))
#define FMA(a, b, c) std::fma((float)(a), (float)(b), (float)(c))
#define EXPF(x) std::exp((float)(x))
#define ERFF(x) std::erf((float)(x))
#define TANHF(x) std::tanh((float)(x))
#define AS_FLOAT(i) std::bit_cast<float>(i)
#define AS_BITS(f) std::bit_cast<unsigned int>(f)
#define FDIV(a, b) ((a) / (b))
#define FSQRT(x) std::sqrt((float)(x))
#define KERNEL extern "C"
#define DEVICE
#define SHARED static
#define SYNC() emu::sync()

#include "kernels.cu"

namespace emu {
// A kernel argument as sent: a buffer's address or an int.
struct Arg {
    void* ptr = nullptr;
    int value = 0;
    bool is_ptr = false;
    template <class T>
    operator T*() const {
        if (!is_ptr) throw std::runtime_error("an int where the kernel takes a pointer");
        return static_cast<T*>(ptr);
    }
    operator int() const {
        if (is_ptr) throw std::runtime_error("a buffer where the kernel takes an int");
        return value;
    }
};

using Invoke = std::function<void(const std::vector<Arg>&)>;

template <class... P, std::size_t... I>
void call(void (*f)(P...), const std::vector<Arg>& a, std::index_sequence<I...>) {
    f(static_cast<P>(a[I])...);
}

// A kernel as the emulator runs it: its parameter count, a call with the
// arguments of a request (their number and kinds checked against the
// kernel's signature), and whether it has barriers. Kernels without
// `__syncthreads` run every thread one after another on one OS thread
// (a launch of thousands of threads costs no thread start-ups);
// a `__syncthreads` reached there is an error, not a hang.
struct Entry {
    std::size_t params;
    Invoke invoke;
    bool barriers;
};

template <class... P>
Entry wrap(void (*f)(P...), bool barriers = false) {
    return {sizeof...(P), [f](const std::vector<Arg>& a) { call(f, a, std::index_sequence_for<P...>{}); }, barriers};
}

constexpr bool BARRIERS = true;

static const std::map<std::string, Entry> kernels = {
    {"gate_logits", wrap(gate_logits)},
    {"expert_hidden", wrap(expert_hidden, BARRIERS)},
    {"expert_out", wrap(expert_out, BARRIERS)},
    {"combine", wrap(combine)},
    {"add_shared", wrap(add_shared)},
    {"embed", wrap(embed)},
    {"gather_rows", wrap(gather_rows)},
    {"rms_scale", wrap(rms_scale)},
    {"rms_apply", wrap(rms_apply)},
    {"linear", wrap(linear)},
    {"rope", wrap(rope)},
    {"kv_store", wrap(kv_store)},
    {"attn_scores", wrap(attn_scores)},
    {"attn_softmax", wrap(attn_softmax)},
    {"attn_out", wrap(attn_out)},
    {"add", wrap(add)},
};

// Runs a launch; returns an error message or "".
std::string launch(const std::string& name, dim3 grid, dim3 block, const std::vector<Arg>& args) {
    auto k = kernels.find(name);
    if (k == kernels.end()) return "no kernel named " + name;
    if (k->second.params != args.size()) {
        return name + " takes " + std::to_string(k->second.params) + " arguments, got " + std::to_string(args.size());
    }
    unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535) {
        return "invalid launch shape";
    }
    gridDim = grid;
    blockDim = block;
    if (!k->second.barriers) {
        current = nullptr;
        try {
            for (unsigned z = 0; z < grid.z; z++) {
                for (unsigned y = 0; y < grid.y; y++) {
                    for (unsigned x = 0; x < grid.x; x++) {
                        blockIdx = {x, y, z};
                        for (unsigned t = 0; t < threads; t++) {
                            lane = t;
                            threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
                            k->second.invoke(args);
                        }
                    }
                }
            }
        } catch (std::exception& e) {
            return e.what();
        }
        return "";
    }
    Block state(threads);
    std::string failure;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; t++) {
        pool.emplace_back([&, t] {
            current = &state;
            lane = t;
            threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
            try {
                for (unsigned z = 0; z < grid.z; z++) {
                    for (unsigned y = 0; y < grid.y; y++) {
                        for (unsigned x = 0; x < grid.x; x++) {
                            blockIdx = {x, y, z};
                            k->second.invoke(args);
                            state.arrive(Exit);
                        }
                    }
                }
            } catch (Abort&) {
            } catch (std::exception& e) {
                // A bad argument: every thread sees the same, so all stop here.
                if (t == 0) failure = e.what();
            }
        });
    }
    for (auto& p : pool) p.join();
    return !failure.empty() ? failure : state.error;
}

[[noreturn]] void die(const char* why) {
    std::fprintf(stderr, "micromoe cuda emulator: %s\n", why);
    std::exit(2);
}

void read(void* to, std::size_t n) {
    if (n && std::fread(to, 1, n, stdin) != n) die("request cut short");
}

template <class T>
T take() {
    T v;
    read(&v, sizeof v);
    return v;
}

void write(const void* from, std::size_t n) {
    if (n && std::fwrite(from, 1, n, stdout) != n) die("cannot write a reply");
}

template <class T>
void put(T v) {
    write(&v, sizeof v);
}

struct Buffer {
    std::unique_ptr<unsigned char[]> data;
    std::uint64_t bytes;
};
}  // namespace emu

int main() {
    using namespace emu;
    // Each buffer is its own exact-size allocation, so the address sanitizer
    // reports any read or write past its end.
    std::map<std::uint32_t, Buffer> buffers;
    std::uint32_t next = 1;
    auto lookup = [&](std::uint32_t id) -> Buffer& {
        auto b = buffers.find(id);
        if (b == buffers.end()) die("no such buffer");
        return b->second;
    };
    int op;
    while ((op = std::getchar()) != EOF) {
        switch (op) {
        case 'U':
        case 'A': {
            auto bytes = take<std::uint64_t>();
            if (bytes > (1ull << 34)) die("buffer too large");
            Buffer b{std::make_unique<unsigned char[]>(bytes ? bytes : 1), bytes};
            if (op == 'U') read(b.data.get(), bytes);
            buffers.emplace(next, std::move(b));
            put(next++);
            break;
        }
        case 'D': {
            Buffer& b = lookup(take<std::uint32_t>());
            put(b.bytes);
            write(b.data.get(), b.bytes);
            break;
        }
        case 'F':
            buffers.erase(take<std::uint32_t>());
            break;
        case 'L': {
            std::string name(take<std::uint8_t>(), '\0');
            read(name.data(), name.size());
            dim3 grid{take<std::uint32_t>(), take<std::uint32_t>(), take<std::uint32_t>()};
            dim3 block{take<std::uint32_t>(), take<std::uint32_t>(), take<std::uint32_t>()};
            std::vector<Arg> args(take<std::uint8_t>());
            for (auto& a : args) {
                switch (take<char>()) {
                case 'b':
                    a.ptr = lookup(take<std::uint32_t>()).data.get();
                    a.is_ptr = true;
                    break;
                case 'i':
                    a.value = take<std::int32_t>();
                    break;
                default:
                    die("unknown argument kind");
                }
            }
            std::string error = launch(name, grid, block, args);
            put<std::uint8_t>(error.empty() ? 0 : 1);
            if (!error.empty()) {
                put<std::uint32_t>(error.size());
                write(error.data(), error.size());
            }
            break;
        }
        default:
            die("unknown request");
        }
        std::fflush(stdout);
    }
    return 0;
}
