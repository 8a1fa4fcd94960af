// Python bindings: shardline._shm.Ring, RingClosed, PeerDied, RingCorrupted, sweep_orphans,
// raw_handoff_latency.
// Every wait releases the GIL; small transfers that need no wait keep it, since
// releasing and re-taking it would cost more than the copy.
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings_collectives.hpp"
#include "errors.hpp"
#include "handoff.hpp"
#include "py_wait.hpp"
#include "ring.hpp"
#include "sweep.hpp"

namespace py = pybind11;
using namespace shardline;

namespace {

constexpr uint64_t kHoldGilBytes = 64 * 1024;

// reader_pids as Ring::wait_attached takes them; it checks the values, this the types.
std::vector<int64_t> pids_from(const py::object& reader_pids) {
    std::vector<int64_t> pids;
    if (reader_pids.is_none()) return pids;
    if (!py::isinstance<py::list>(reader_pids) && !py::isinstance<py::tuple>(reader_pids)) {
        throw py::type_error("reader_pids must be None or a list of process ids (ints), got " +
                             std::string(py::str(py::type::of(reader_pids).attr("__name__"))));
    }
    size_t i = 0;
    for (const py::handle& item : reader_pids) {
        std::string argument = "reader_pids[" + std::to_string(i++) + "]";
        if (PyBool_Check(item.ptr()) || !PyIndex_Check(item.ptr())) {
            throw py::type_error(argument + " must be an int process id, got " +
                                 std::string(py::str(py::type::of(item).attr("__name__"))) + " " +
                                 std::string(py::repr(item)));
        }
        auto index = py::reinterpret_steal<py::object>(PyNumber_Index(item.ptr()));
        if (!index) throw py::error_already_set();
        int overflow = 0;
        long long pid = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
        if (overflow != 0) {
            throw py::value_error(argument + " must be in [1, " + std::to_string(std::numeric_limits<pid_t>::max()) +
                                  "], got " + std::string(py::repr(item)));
        }
        pids.push_back(pid);
    }
    return pids;
}

// The contiguous bytes of one Python buffer, held for the duration of a write.
class BufferView {
public:
    explicit BufferView(const py::handle& obj) {
        if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
    }
    ~BufferView() { PyBuffer_Release(&view_); }
    BufferView(const BufferView&) = delete;
    BufferView& operator=(const BufferView&) = delete;
    Part part() const { return Part{static_cast<const char*>(view_.buf), static_cast<size_t>(view_.len)}; }

private:
    Py_buffer view_;
};

// Lets Ctrl-C (and any other pending signal handler's exception) end a long wait.
// One side of a ring as seen from Python.
class PyRing {
public:
    explicit PyRing(std::unique_ptr<Ring> ring) : ring_(std::move(ring)) {
        ring_->set_interrupt_check(&raise_pending_signals);
    }

    Ring& ring() { return *ring_; }

    void write(const py::buffer& data, std::optional<double> timeout) {
        Deadline deadline = deadline_from(timeout);
        BufferView view(data);
        Part part = view.part();
        write_parts(&part, 1, deadline);
    }

    void write_sequence(const py::sequence& parts, std::optional<double> timeout) {
        Deadline deadline = deadline_from(timeout);
        std::vector<std::unique_ptr<BufferView>> views;
        std::vector<Part> spans;
        views.reserve(parts.size());
        spans.reserve(parts.size());
        for (const py::handle& item : parts) {
            views.push_back(std::make_unique<BufferView>(item));
            spans.push_back(views.back()->part());
        }
        write_parts(spans.data(), spans.size(), deadline);
    }

    py::object read(std::optional<double> timeout) {
        Deadline deadline = deadline_from(timeout);
        for (;;) {
            if (partial_.is_none()) {
                std::optional<uint64_t> bytes = ring_->poll_message();
                if (!bytes) {
                    py::gil_scoped_release release;
                    bytes = ring_->begin_message(deadline);
                }
                PyObject* buffer = PyByteArray_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(*bytes));
                if (buffer == nullptr) throw py::error_already_set();
                partial_ = py::reinterpret_steal<py::object>(buffer);
                partial_bytes_ = *bytes;
            }
            char* dst = PyByteArray_AS_STRING(partial_.ptr());
            bool complete;
            if (partial_bytes_ <= kHoldGilBytes && ring_->message_ready()) {
                complete = ring_->read_body(dst, deadline);
            } else {
                py::gil_scoped_release release;
                complete = ring_->read_body(dst, deadline);
            }
            py::object message = std::exchange(partial_, py::none());
            if (complete) return message;
        }
    }

    void wait_attached(std::optional<double> timeout, const py::object& reader_pids) {
        Deadline deadline = deadline_from(timeout);
        std::vector<int64_t> pids = pids_from(reader_pids);
        py::gil_scoped_release release;
        ring_->wait_attached(deadline, pids);
    }

private:
    void write_parts(const Part* parts, size_t n_parts, Deadline deadline) {
        uint64_t total = 0;
        for (size_t i = 0; i < n_parts; ++i) total += parts[i].bytes;
        if (total <= kHoldGilBytes && ring_->is_writer() && ring_->can_write_now(total)) {
            ring_->write(parts, n_parts, deadline);
        } else {
            py::gil_scoped_release release;
            ring_->write(parts, n_parts, deadline);
        }
    }

    std::unique_ptr<Ring> ring_;
    py::object partial_ = py::none();  // a message whose read timed out midway; the next read resumes it
    uint64_t partial_bytes_ = 0;
};

}  // namespace

PYBIND11_MODULE(_shm, m) {
    m.doc() = "Lock-free shared-memory broadcast rings (one writer, 1..64 readers) with futex waits.";
    bind_collectives(m);

    py::register_exception<RingClosedError>(m, "RingClosed");
    py::register_exception<PeerDiedError>(m, "PeerDied");
    py::register_exception<RingCorruptedError>(m, "RingCorrupted", PyExc_RuntimeError);
    py::register_exception_translator([](std::exception_ptr error) {
        try {
            if (error) std::rethrow_exception(error);
        } catch (const TimeoutError& e) {
            PyErr_SetString(PyExc_TimeoutError, e.what());
        } catch (const OsError& e) {
            py::object args = py::make_tuple(e.error, e.what());
            PyErr_SetObject(PyExc_OSError, args.ptr());
        }
    });

    py::class_<PyRing>(m, "Ring",
                       "One side of a shared-memory ring: the writer (from create) or one reader (from attach).\n"
                       "A Ring object must not be used by two threads at once, except close().")
        .def_static(
            "create",
            [](int64_t n_readers, int64_t n_slots, int64_t slot_size) {
                std::unique_ptr<Ring> ring;
                {
                    py::gil_scoped_release release;
                    ring = Ring::create(n_readers, n_slots, slot_size);
                }
                return std::make_unique<PyRing>(std::move(ring));
            },
            py::arg("n_readers"), py::arg("n_slots"), py::arg("slot_size"),
            "Create a ring with n_readers readers and n_slots slots of slot_size bytes; the caller is the writer.\n"
            "First removes the segments of writers that died before their readers attached (see\n"
            "sweep_orphans), so a crash leaks nothing in /dev/shm past the next create on the machine.")
        .def_static(
            "attach",
            [](const std::string& name, int64_t reader_index) {
                return std::make_unique<PyRing>(Ring::attach(name, reader_index));
            },
            py::arg("name"), py::arg("reader_index"),
            "Attach to the ring `name` as reader `reader_index` (0 <= reader_index < n_readers).")
        .def_property_readonly("name", [](PyRing& self) { return self.ring().name(); })
        .def_property_readonly("n_readers", [](PyRing& self) { return self.ring().n_readers(); })
        .def_property_readonly("n_slots", [](PyRing& self) { return self.ring().n_slots(); })
        .def_property_readonly("slot_size", [](PyRing& self) { return self.ring().slot_size(); })
        .def_property_readonly("reader_index", [](PyRing& self) { return self.ring().reader_index(); },
                               "This reader's index, or -1 for the writer.")
        .def("write", &PyRing::write, py::arg("data"), py::arg("timeout") = py::none(),
             "Write one message (any contiguous buffer). timeout in seconds; None waits forever.\n"
             "Raises RuntimeError until every reader has attached: call wait_attached first.")
        .def("write_parts", &PyRing::write_sequence, py::arg("parts"), py::arg("timeout") = py::none(),
             "Write one message made of the concatenation of parts, without joining them first.")
        .def("read", &PyRing::read, py::arg("timeout") = py::none(),
             "Read the next whole message as a bytearray.")
        .def("wait_attached", &PyRing::wait_attached, py::arg("timeout") = py::none(),
             py::arg("reader_pids") = py::none(),
             "Writer: wait until all n_readers have attached.\n"
             "reader_pids: the pids of the processes expected to attach (e.g. the workers this process\n"
             "spawned), each once; raises PeerDied naming the pid within about 0.2 s of one of them\n"
             "dying while a reader is still missing. Without it only the timeout ends that wait.")
        .def("close", [](PyRing& self) { self.ring().close(); },
             "Close the ring for every side, waking all waiters: readers still receive what was\n"
             "published before, then raise RingClosed. Idempotent. Dropping the object closes it too\n"
             "(in the process that owns this end; a copy inherited through fork does not).")
        .def("__enter__", [](py::object self) { return self; })
        .def("__exit__", [](PyRing& self, const py::args&) { self.ring().close(); })
        .def("__repr__", [](PyRing& self) {
            Ring& r = self.ring();
            std::string side = r.is_writer() ? "writer" : "reader " + std::to_string(r.reader_index());
            return "<shardline._shm.Ring " + r.name() + " " + side + ", n_readers=" + std::to_string(r.n_readers()) +
                   ", n_slots=" + std::to_string(r.n_slots()) + ", slot_size=" + std::to_string(r.slot_size()) +
                   ">";
        });

    m.def(
        "sweep_orphans",
        [] {
            py::gil_scoped_release release;
            return sweep_orphans();
        },
        "Unlink the /dev/shm segments of rings whose writer died before all readers attached\n"
        "(a SIGKILL skips the unlink), and return their names. Touches only this user's complete\n"
        "rings whose writer is a dead process of this pid namespace; maps only their headers.\n"
        "Ring.create runs it too; a launcher may call it at startup.");

    m.def(
        "raw_handoff_latency",
        [](int64_t payload_bytes, int64_t iterations, int64_t n_slots, int64_t slot_size) {
            py::gil_scoped_release release;
            return raw_handoff_latency(payload_bytes, iterations, n_slots, slot_size);
        },
        py::arg("payload_bytes"), py::arg("iterations"), py::arg("n_slots") = 64, py::arg("slot_size") = 4096,
        "One-way ring handoff latency in ns per message, measured in C++ with a forked reader process.");

    m.def(
        "_set_pause_after_spin",
        [](double seconds) {
            if (!(seconds >= 0 && seconds <= 10)) {
                throw std::invalid_argument("seconds must be in [0, 10], got " + std::to_string(seconds));
            }
            Ring::set_pause_after_spin_for_tests(static_cast<int64_t>(seconds * 1e9));
        },
        py::arg("seconds"),
        "Testing only: every ring wait of this process that outlasts its spin phase sleeps `seconds`\n"
        "before it first looks at close and peer liveness, so that tests can hit the races of that\n"
        "moment deterministically. 0 (the default) turns it off.");
}
