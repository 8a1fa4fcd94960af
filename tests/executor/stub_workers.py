"""Workers without a model, for testing the executors' plumbing in spawned processes.

The executor builds them by dotted path (`ParallelConfig.worker_cls`), so they live in a
module of their own that the spawned processes can import.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import time

from shardline.ipc.serializer import Decoder, Encoder
from shardline.step import ModelRunnerOutput, SchedulerOutput

NUM_KV_BLOCKS = 8


class StubWorker:
    """Answers every setup call; `execute_model` samples token 1000 + rank per request."""

    def __init__(self, config, rank: int = 0, distributed_init_method: str | None = None):
        self.config, self.rank = config, rank

    def init_device(self) -> None:
        pass

    def load_model(self) -> None:
        pass

    def determine_num_kv_blocks(self) -> int:
        return NUM_KV_BLOCKS + self.rank

    def initialize_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks

    def warm_up(self) -> None:
        pass

    def identity(self) -> list:
        return [self.rank, os.getpid(), self.num_blocks]

    def echo(self, value, *, scale: int = 1):
        return value * scale

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def crash(self, rank: int | None = None) -> float:
        """ZeroDivisionError on `rank` (on every rank if None); 0.0 on the others."""
        return 1 / 0 if rank in (None, self.rank) else 0.0

    def unsendable(self, rank: int | None = None) -> object:
        """A result the rings cannot carry on `rank` (on every rank if None)."""
        return {self.rank, object()} if rank in (None, self.rank) else self.rank

    def sleep(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.rank

    def fail_on(self, rank: int, message: str, seconds: float) -> int:
        """ValueError(message) on `rank`; `sleep(seconds)` on the others."""
        if self.rank == rank:
            raise ValueError(message)
        return self.sleep(seconds)

    def hold(self, directory: str, seconds: float) -> int:
        """`sleep`, after leaving a file named after this rank in `directory`: a sign
        that the rank is inside the call."""
        open(os.path.join(directory, str(self.rank)), "w").close()
        return self.sleep(seconds)

    def environ(self, name: str) -> str | None:
        return os.environ.get(name)

    def log(self, message: str) -> None:
        logging.getLogger("shardline.test").warning(message)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        req_ids = list(scheduler_output.num_scheduled_tokens)
        return ModelRunnerOutput(req_ids=req_ids,
                                 sampled_token_ids=[1000 + self.rank] * len(req_ids),
                                 logprobs=[None] * len(req_ids))


class CrashOnStepWorker(StubWorker):
    """Raises inside execute_model on rank 1, as a worker whose forward pass fails."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self.rank == 1:
            raise RuntimeError("forward failed on purpose")
        return super().execute_model(scheduler_output)


class FailingRankWorker(StubWorker):
    """Rank $STUB_FAIL_RANK raises RuntimeError($STUB_FAIL_MESSAGE) where $STUB_FAIL_IN
    says: "step" (execute_model) or "constructor"."""

    def __init__(self, config, rank: int = 0, distributed_init_method: str | None = None):
        super().__init__(config, rank, distributed_init_method)
        self._fail("constructor")

    def _fail(self, where: str) -> None:
        if os.environ["STUB_FAIL_IN"] == where and self.rank == int(os.environ["STUB_FAIL_RANK"]):
            raise RuntimeError(os.environ["STUB_FAIL_MESSAGE"])

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self._fail("step")
        return super().execute_model(scheduler_output)


def run_worker_joining_late(args, handle_conn, log_queue) -> None:
    """worker_proc.run_worker, except that rank 3 joins the broadcast ring 2 s late: the
    other ranks are serving by then, and the executor still waits for rank 3 to join."""
    from shardline.executor import worker_proc
    from shardline.ipc import MessageQueue

    if args.rank == 3:
        attach = MessageQueue.attach

        def attach_late(handle, reader_index):
            time.sleep(2.0)
            return attach(handle, reader_index)

        MessageQueue.attach = attach_late
    worker_proc.run_worker(args, handle_conn, log_queue)


# A SHARDLINE_* variable, so that the Ray executor passes it on to its actors too.
STEP_TIMES_ENV = "SHARDLINE_TEST_STEP_TIMES"


class SlowStepWorker(StubWorker):
    """Takes STEP_S over every step, so that steps are still in flight when a test kills a
    worker or asks for its stacks. Where $SHARDLINE_TEST_STEP_TIMES names a directory,
    each rank adds a line "begun ended" (time.time()) per step to a file named after it
    there: a signal sent between the two reached the rank inside execute_model."""

    STEP_S = 3.0

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        begun = time.time()
        time.sleep(self.STEP_S)
        directory = os.environ.get(STEP_TIMES_ENV)
        if directory:
            with open(os.path.join(directory, str(self.rank)), "a") as notes:
                notes.write(f"{begun!r} {time.time()!r}\n")
        return super().execute_model(scheduler_output)


def corrupt_frame(frame: bytes, kind: str) -> bytes:
    """`frame` made unreadable in one of four ways (`kind`): "msgpack", a byte msgpack
    never uses where the msgpack part starts; "length", a header announcing more bytes
    than the frame holds; "not_a_message", a sound frame of a bare int; "renamed_key",
    the sound frame with the key "req_ids" misspelt (a flipped bit in a str)."""
    if kind == "renamed_key":
        return frame.replace(b"req_ids", b"req_ide")
    if kind == "msgpack":
        return frame[:4] + b"\xc1" + frame[5:]
    if kind == "length":
        return struct.pack("<I", len(frame)) + frame[4:]
    return b"".join(Encoder().encode(7))


def corrupting_encode(kind: str):
    """A replacement for Encoder.encode whose frame is corrupt_frame(kind) of the real one."""
    encode = Encoder.encode

    def encode_corrupt(self, obj):
        parts = encode(self, obj)
        frame = b"".join(p.tobytes() if hasattr(p, "tobytes") else bytes(p) for p in parts)
        return [corrupt_frame(frame, kind)]
    return encode_corrupt


def patch_once(cls: type, name: str, replacement, skip: int = 0) -> None:
    """Make `cls.name` run `replacement` once, after `skip` calls of the original."""
    original = getattr(cls, name)
    calls = itertools.count()

    def once(self, value):
        if next(calls) < skip:
            return original(self, value)
        setattr(cls, name, original)
        return replacement(self, value)
    setattr(cls, name, once)


class CorruptingWorker(StubWorker):
    """Corrupts, on one rank, a frame it writes to its response ring or one it reads from
    the broadcast ring, as damaged shared memory would."""

    def corrupt_reply(self, rank: int, kind: str, skip: int) -> None:
        """On `rank`: corrupt the reply frame to this call (`skip` 0) or a later one."""
        if self.rank == rank:
            patch_once(Encoder, "encode", corrupting_encode(kind), skip)

    def corrupt_next_call(self, rank: int, kind: str) -> None:
        """On `rank`: corrupt the next call frame read from the broadcast ring."""
        if self.rank == rank:
            decode = Decoder.decode
            patch_once(Decoder, "decode",
                       lambda decoder, frame: decode(decoder, corrupt_frame(bytes(frame), kind)))


# A SHARDLINE_* variable, so that the Ray executor passes it on to its actors too.
TIME_FILE_ENV = "SHARDLINE_TEST_TIME_FILE"


def note_time() -> None:
    """Write the time (time.monotonic, the same clock in every process) to the file
    $SHARDLINE_TEST_TIME_FILE, if set, for a test that measures from an event in a worker."""
    path = os.environ.get(TIME_FILE_ENV)
    if path:
        with open(path, "w") as note:
            note.write(repr(time.monotonic()))


class DiesInInitWorker(StubWorker):
    """Rank 1 dies in init_device (noting the time first); the other ranks wait there far
    longer than any test, as torch.distributed's rendezvous waits for a rank that never
    comes."""

    def init_device(self) -> None:
        if self.rank == 1:
            note_time()
            os._exit(5)
        time.sleep(60.0)


class FailsInInitWorker(StubWorker):
    """Rank 1's init_device raises (noting the time first); the other ranks wait there as
    in DiesInInitWorker."""

    def init_device(self) -> None:
        if self.rank == 1:
            note_time()
            raise RuntimeError("init_device failed on purpose")
        time.sleep(60.0)


class SpinningWorker(StubWorker):
    """Never returns from a step holding request "spin": a busy loop, as a worker caught in
    an endless loop (alive, running, answering nothing)."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        while "spin" in scheduler_output.num_scheduled_tokens:
            pass
        return super().execute_model(scheduler_output)
