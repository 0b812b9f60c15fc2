"""Timing programs that take turns on one machine, so that its changing speed falls on all of them alike.

A shared machine's speed drifts by tens of percent within minutes, so two training loops timed one after the other
compare the machine's moments as much as the loops. Here each loop runs in its own process (its own memory
settings, threads and loader workers) and the processes take turns: the parent (``interleave``) lets one run a
turn of a few steps while the others wait at their ``Gate``, alternating the order every round. ``SteadyWindow``
times a loader's batches in such turns, after untimed warm-up batches.
"""
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from utils import DataError


class Gate:
    """The child's side of the turn-taking between pipeline processes (see ``interleave``): ``wait`` writes
    ``ready`` to the report pipe and blocks until the parent writes ``go`` on stdin; ``report`` writes a turn's
    seconds. ``Gate(None)`` (a pipeline run on its own) never blocks and reports nothing.

    Args:
        report_fd: int, the write end of a pipe the parent reads, or None.
    """

    def __init__(self, report_fd):
        self.out = None if report_fd is None else os.fdopen(report_fd, 'w', buffering=1)

    def wait(self):
        """Block until the parent lets this process run (no-op without a pipe)."""
        if self.out is not None:
            self.out.write('ready\n')
            if sys.stdin.readline().strip() != 'go':
                raise SystemExit('the process that started this one went away')

    def report(self, seconds):
        """Tell the parent a turn's seconds (no-op without a pipe)."""
        if self.out is not None:
            self.out.write(f'turn {seconds!r}\n')


class SteadyWindow:
    """A DataLoader timed in steady state: after ``warmup`` untimed batches, the rest are timed in turns of
    ``turn_steps`` batches, each from the moment the turn's first batch is asked for to the moment the batch after
    its last one is (so a turn holds its steps' loading, forward, backward and optimizer work); worker start-up and
    warm-up steps stay outside. Before each turn the window passes ``gate.wait()`` and after it calls
    ``gate.report(seconds)``, so that pipelines in separate processes can take turns on the same cores.

    Args:
        loader: torch DataLoader. warmup: int, untimed batches first. device: torch.device (CUDA is synchronised at
            both ends of each turn). turn_steps: int, batches a turn (default: all timed batches in one turn).
        gate: ``Gate`` or None.
    """

    def __init__(self, loader, warmup, device, turn_steps=None, gate=None):
        self.loader, self.warmup, self.device, self.gate = loader, warmup, device, gate
        self.turn_steps = turn_steps or max(1, len(loader) - warmup)
        self.batch_size, self.drop_last, self.sampler = loader.batch_size, loader.drop_last, loader.sampler
        self.turns, self.loading = [], 0.0  # seconds of each timed turn; of those, seconds waiting for batches

    def __len__(self):
        return len(self.loader)

    def _now(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _end_turn(self, start):
        seconds = self._now() - start
        self.turns.append(seconds)
        if self.gate is not None:
            self.gate.report(seconds)

    def __iter__(self):
        self.turns, self.loading, start, batches = [], 0.0, None, iter(self.loader)
        for i in range(len(self.loader)):
            if i >= self.warmup and (i - self.warmup) % self.turn_steps == 0:
                if start is not None:
                    self._end_turn(start)
                if self.gate is not None:
                    self.gate.wait()
                start = self._now()
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            if start is not None:
                self.loading += time.perf_counter() - t0
            yield batch
        if start is not None:
            self._end_turn(start)

    def images_per_second(self, steps):
        """Images per second over the timed turns, which hold ``steps`` batches."""
        return steps * self.batch_size / sum(self.turns)

    def loader_share(self):
        """The fraction of the timed turns spent waiting for the loader's batches."""
        return self.loading / sum(self.turns)


class Child:
    """One pipeline's process, driven by ``interleave``: it reports ``ready`` / ``turn SECONDS`` lines on a pipe
    and waits for ``go`` on its stdin (``Gate``); its stdout and stderr go to files in ``folder``.

    Args:
        name: str, the pipeline's name in messages. command: list of str, the process to run, to which
            ``--report_fd N`` is appended. folder: pathlib.Path for its output files.
    """

    def __init__(self, name, command, folder):
        self.name = name
        read_end, write_end = os.pipe()
        self.out, self.err = (open(Path(folder) / f'{name}.{ext}', 'w+') for ext in ('out', 'err'))
        self.proc = subprocess.Popen([*command, '--report_fd', str(write_end)], stdin=subprocess.PIPE,
                                     stdout=self.out, stderr=self.err, text=True, pass_fds=(write_end,))
        os.close(write_end)
        self.reports = os.fdopen(read_end)

    def expect(self, word):
        """Read the next report line, which must start with ``word``; returns the rest of the line's words.

        Raises:
            DataError, RuntimeError: the process ended instead (see ``failure``).
        """
        line = self.reports.readline().split()
        if not line or line[0] != word:
            raise self.failure(word)
        return line[1:]

    def go(self):
        """Let the process run its next part (a turn, or the rest after the last one)."""
        try:
            self.proc.stdin.write('go\n')
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self.failure() from None

    def failure(self, expected=None):
        """The exception for a process that stopped early: DataError with its one-line ``error:`` message (e.g. a
        missing data folder), else RuntimeError with the end of its stderr; one that ended cleanly without the
        ``expected`` report (str), as one whose loader runs out of batches does, is named so."""
        self.proc.wait()
        self.err.seek(0)
        stderr = self.err.read()
        last = stderr.strip().splitlines()[-1:] or ['']
        if last[0].startswith('error: '):
            return DataError(f'{self.name} pipeline: {last[0][len("error: "):]}')
        if self.proc.returncode == 0 and expected:
            return RuntimeError(f'{self.name} pipeline ended before its "{expected}" report (as one does whose loader '
                                f'holds fewer batches than its warm-up and timed steps)')
        return RuntimeError(f'{self.name} pipeline failed (exit status {self.proc.returncode}):\n{stderr[-3000:]}')

    def finish(self):
        """Let the process run to its end; returns the JSON object on the last line of its stdout."""
        self.go()
        if self.proc.wait() != 0:
            raise self.failure()
        self.out.seek(0)
        return json.loads(self.out.read().strip().splitlines()[-1])

    def close(self):
        """Stop the process if it still runs, and close the files."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.reports, self.out, self.err, self.proc.stdin):
            with contextlib.suppress(OSError):  # a pipe to a process that died may refuse its last flush
                f.close()


def interleave(commands, rounds):
    """Run processes that take turns on the machine, so that its changing speed (shared, noisy machines) falls on
    all of them alike: each starts, sets up and warms up while the others wait; then in each of ``rounds`` rounds
    each runs one turn alone (the order reversed every other round, so a steady drift falls evenly); then each
    runs its remaining part alone, in order.

    Args:
        commands: dict name -> command (list of str) of processes that speak the ``Gate`` protocol.
        rounds: int, turns of each process.

    Returns:
        dict name -> the JSON object on the last line of that process's stdout.

    Raises:
        DataError, RuntimeError: a process stopped early (``Child.failure``); the others are stopped.
    """
    names, children = list(commands), {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in names:
                children[name] = Child(name, commands[name], tmp)
                children[name].expect('ready')
            for r in range(rounds):
                for name in (names if r % 2 == 0 else names[::-1]):
                    children[name].go()
                    children[name].expect('turn')
                    children[name].expect('ready')
            return {name: children[name].finish() for name in names}
        finally:
            for child in children.values():
                child.close()


def round_ratios(tuned_turns, other_turns):
    """Speed of the tuned pipeline over another in each round: the other's turn seconds / the tuned one's (turns
    of the same number of steps and images)."""
    return [other / tuned for tuned, other in zip(tuned_turns, other_turns)]
