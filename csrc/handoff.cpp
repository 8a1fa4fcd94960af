#include "handoff.hpp"

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "clock.hpp"
#include "errors.hpp"
#include "futex.hpp"
#include "ring.hpp"

namespace shardline {
namespace {

constexpr int64_t kMaxIterations = 100'000'000;
constexpr int64_t kMaxPayload = 1ll << 30;
// Gives the reader time to be back in its wait before the next message, so each
// sample is a handoff to a waiting reader rather than a queued one.
constexpr int64_t kGapNs = 2'000;
constexpr int64_t kStampBytes = sizeof(int64_t);

// Runs in the forked child: no Python, no allocation, leaves with _exit.
[[noreturn]] void run_reader(Ring& reader, char* buffer, int64_t* results, int64_t iterations) {
    try {
        reader.adopt_current_process();
        for (int64_t i = 0; i < iterations; ++i) {
            reader.begin_message(Deadline::never());
            reader.read_body(buffer, Deadline::never());
            int64_t now = monotonic_ns();
            int64_t stamp;
            std::memcpy(&stamp, buffer, sizeof(stamp));
            results[i] = now - stamp;
        }
        _exit(0);
    } catch (...) {
        _exit(1);
    }
}

void wait_for_drain(Ring& writer, pid_t child) {
    for (uint64_t spins = 1; !writer.drained(); ++spins) {
        cpu_relax();
        if (spins % (1u << 20) == 0) {
            int status;
            if (waitpid(child, &status, WNOHANG) == child) {
                throw std::runtime_error("raw_handoff_latency: the reader process exited early (status " +
                                         std::to_string(status) + ")");
            }
        }
    }
}

}  // namespace

std::vector<int64_t> raw_handoff_latency(int64_t payload_bytes, int64_t iterations, int64_t n_slots,
                                         int64_t slot_size) {
    if (payload_bytes < kStampBytes || payload_bytes > kMaxPayload) {
        throw std::invalid_argument("payload_bytes must be in [" + std::to_string(kStampBytes) + ", " +
                                    std::to_string(kMaxPayload) + "], got " + std::to_string(payload_bytes));
    }
    if (iterations < 1 || iterations > kMaxIterations) {
        throw std::invalid_argument("iterations must be in [1, " + std::to_string(kMaxIterations) + "], got " +
                                    std::to_string(iterations));
    }
    auto writer = Ring::create(1, n_slots, slot_size);
    auto reader = Ring::attach(writer->name(), 0);
    std::vector<char> send(payload_bytes, 'x');
    std::vector<char> receive(payload_bytes);
    size_t results_bytes = sizeof(int64_t) * static_cast<size_t>(iterations);
    void* shared = mmap(nullptr, results_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED) {
        throw OsError(errno, std::string("raw_handoff_latency: mmap of the results failed: ") + std::strerror(errno));
    }
    auto* results = static_cast<int64_t*>(shared);

    pid_t child = fork();
    if (child < 0) {
        int err = errno;
        munmap(shared, results_bytes);
        throw OsError(err, std::string("raw_handoff_latency: fork failed: ") + std::strerror(err));
    }
    if (child == 0) run_reader(*reader, receive.data(), results, iterations);

    try {
        Part part{send.data(), send.size()};
        for (int64_t i = 0; i < iterations; ++i) {
            wait_for_drain(*writer, child);
            int64_t ready_at = monotonic_ns() + kGapNs;
            while (monotonic_ns() < ready_at) cpu_relax();
            int64_t stamp = monotonic_ns();
            std::memcpy(send.data(), &stamp, sizeof(stamp));
            writer->write(&part, 1, Deadline::after_ns(10'000'000'000));
        }
    } catch (...) {
        writer->close();
        waitpid(child, nullptr, 0);
        munmap(shared, results_bytes);
        throw;
    }
    int status = 0;
    waitpid(child, &status, 0);
    std::vector<int64_t> out(results, results + iterations);
    munmap(shared, results_bytes);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        throw std::runtime_error("raw_handoff_latency: the reader process failed (status " + std::to_string(status) +
                                 ")");
    }
    return out;
}

}  // namespace shardline
