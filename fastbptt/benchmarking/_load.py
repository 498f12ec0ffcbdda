"""How busy the machine was while a benchmark ran: the CPU time of *other* processes.

A benchmark's own threads make the load average high, so the load average cannot tell
a neighbour from oneself. Linux's ``/proc/stat`` counts the busy time of every CPU of
the machine (user, nice, system, irq, softirq and steal, in clock ticks) since boot;
``time.process_time()`` counts this process's own CPU time, every thread included.
Between two samples,

    others = Δbusy(/proc/stat) − Δown        fraction = others / (Δwall × cores)

is the share of the machine's CPU time that went to other processes (and, in a virtual
machine, to the hypervisor's other guests: steal) while the benchmark ran. A row timed
while ``fraction`` was high was probably slowed down by them.

/proc/stat counts in ticks (1/100 s on most systems), so the fraction of a window of
Δwall seconds is uncertain by about one tick per core over Δwall × cores: ``resolution``,
tick / Δwall. A window counts as disturbed only when the fraction exceeds the threshold
by more than that.

Where /proc/stat does not exist (macOS, Windows) nothing is measured: ``LoadMonitor.available``
is False, ``why_unavailable`` says so, and ``since()`` returns None.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

PROC_STAT = "/proc/stat"

#: Share of the machine's CPU time used by other processes above which a window is disturbed.
DEFAULT_THRESHOLD = 0.1

# the columns of /proc/stat's "cpu" line: user nice system idle iowait irq softirq steal guest
# guest_nice. guest and guest_nice are already counted in user and nice; idle and iowait are idle.
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)
_STEAL_COLUMN = 7
_CPU_LINE = re.compile(r"cpu\d+\s")


def parse_proc_stat(text):
    """Busy and steal ticks summed over all CPUs, and the number of CPUs, from /proc/stat's text.

    Parameters
    ----------
    text : str
        The contents of /proc/stat: an aggregate ``cpu`` line of at least four counters,
        then one ``cpuN`` line per CPU.

    Returns
    -------
    busy : int
        Ticks the CPUs spent in user, nice, system, irq, softirq and steal time.
    steal : int
        The steal ticks alone (time a hypervisor gave to other virtual machines).
    cores : int
        Number of ``cpuN`` lines (at least 1).

    Raises
    ------
    ValueError
        When the text has no aggregate ``cpu`` line of at least four integers.
    """
    total = None
    cores = 0
    for line in text.splitlines():
        if line.startswith("cpu "):
            try:
                total = [int(v) for v in line.split()[1:]]
            except ValueError:
                total = None
        elif _CPU_LINE.match(line):
            cores += 1
    if total is None or len(total) < 4:
        raise ValueError("/proc/stat has no 'cpu' line of at least four counters")
    busy = sum(total[i] for i in _BUSY_COLUMNS if i < len(total))
    steal = total[_STEAL_COLUMN] if len(total) > _STEAL_COLUMN else 0
    return busy, steal, max(cores, 1)


def read_proc_stat(path=PROC_STAT):
    """The text of /proc/stat, or None where it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _ticks_per_second():
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


@dataclass(frozen=True)
class Sample:
    """One reading: wall clock, busy and steal seconds of all CPUs since boot, own CPU seconds."""

    wall: float
    busy: float
    steal: float
    own: float


@dataclass(frozen=True)
class Load:
    """What the CPUs did during a window of ``wall_s`` seconds.

    ``busy_s`` is the busy time of all ``cores`` CPUs together, ``own_s`` this process's
    CPU time, ``steal_s`` the part of ``busy_s`` a hypervisor gave to other machines and
    ``tick_s`` the resolution of /proc/stat's counters. Windows add up (``a + b``): the
    sum is the load over both.
    """

    wall_s: float
    cores: int
    busy_s: float
    own_s: float
    steal_s: float = 0.0
    tick_s: float = 0.01

    @property
    def others_s(self):
        """CPU seconds used by other processes (never negative: the counters' ticks are coarse)."""
        return max(self.busy_s - self.own_s, 0.0)

    @property
    def fraction(self):
        """Share of the machine's CPU time (wall × cores) that went to other processes, in [0, 1].

        (The counters' ticks can make a short window's share exceed 1; it is cut there.)
        """
        capacity = self.wall_s * self.cores
        return min(self.others_s / capacity, 1.0) if capacity > 0 else 0.0

    @property
    def others_cores(self):
        """How many cores other processes kept busy on average."""
        return self.others_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def resolution(self):
        """Uncertainty of ``fraction`` from the counters' ticks: one tick per core, over wall × cores."""
        return self.tick_s / self.wall_s if self.wall_s > 0 else float("inf")

    def disturbed(self, threshold=DEFAULT_THRESHOLD):
        """Whether other processes used more than ``threshold`` of the machine, beyond the resolution."""
        return self.fraction - self.resolution > threshold

    def __add__(self, other):
        if other is None:
            return self
        if not isinstance(other, Load):
            return NotImplemented
        return Load(self.wall_s + other.wall_s, max(self.cores, other.cores), self.busy_s + other.busy_s,
                    self.own_s + other.own_s, self.steal_s + other.steal_s, max(self.tick_s, other.tick_s))

    def as_dict(self, threshold=DEFAULT_THRESHOLD):
        """The fields, the derived figures and ``disturbed`` at ``threshold``, for JSON."""
        return {"wall_s": self.wall_s, "cores": self.cores, "busy_cpu_s": self.busy_s,
                "own_cpu_s": self.own_s, "steal_cpu_s": self.steal_s, "others_cpu_s": self.others_s,
                "others_fraction": self.fraction, "others_cores": self.others_cores,
                "tick_s": self.tick_s, "resolution": self.resolution, "threshold": threshold,
                "disturbed": self.disturbed(threshold)}

    @classmethod
    def from_dict(cls, d):
        """The Load that ``as_dict`` described."""
        return cls(d["wall_s"], d["cores"], d["busy_cpu_s"], d["own_cpu_s"], d["steal_cpu_s"], d["tick_s"])


def total(loads):
    """The sum of the windows in ``loads`` that were measured (None when none was)."""
    measured = [load for load in loads if load is not None]
    return sum(measured[1:], measured[0]) if measured else None


class LoadMonitor:
    """Samples /proc/stat and this process's CPU time; ``since(sample)`` gives the load in between.

    Parameters
    ----------
    read_stat : callable returning str or None
        Where /proc/stat's text comes from (tests pass fake contents); None means unavailable.
    own_time : callable returning float
        This process's CPU seconds, all threads (``time.process_time``).
    clock : callable returning float
        Wall-clock seconds (``time.perf_counter``).
    ticks_per_second : int, optional
        /proc/stat's unit (``os.sysconf("SC_CLK_TCK")``, usually 100).
    """

    def __init__(self, read_stat=read_proc_stat, own_time=time.process_time, clock=time.perf_counter,
                 ticks_per_second=None):
        self._read = read_stat
        self._own = own_time
        self._clock = clock
        self.tick_s = 1.0 / (ticks_per_second or _ticks_per_second())
        self.cores = None
        self.why_unavailable = None
        self._stat()                                   # is it there at all, and how many CPUs
        self.available = self.why_unavailable is None

    def _stat(self):
        text = self._read()
        if text is None:
            self.why_unavailable = "/proc/stat cannot be read on this system"
            return None
        try:
            busy, steal, cores = parse_proc_stat(text)
        except ValueError as exc:
            self.why_unavailable = str(exc)
            return None
        self.cores = cores
        return busy, steal

    def sample(self):
        """A Sample now, or None when the load cannot be measured here."""
        if not self.available:
            return None
        own = self._own()
        wall = self._clock()
        stat = self._stat()
        if stat is None:
            return None
        return Sample(wall, stat[0] * self.tick_s, stat[1] * self.tick_s, own)

    def since(self, start):
        """The Load between ``start`` (a Sample) and now; None when either cannot be measured."""
        if start is None:
            return None
        stop = self.sample()
        if stop is None:
            return None
        return Load(wall_s=stop.wall - start.wall, cores=self.cores, busy_s=stop.busy - start.busy,
                    own_s=stop.own - start.own, steal_s=stop.steal - start.steal, tick_s=self.tick_s)


def describe(load, threshold=DEFAULT_THRESHOLD):
    """One line on ``load`` for people: the others' share of the machine and cores."""
    text = (f"other processes used {100 * load.fraction:.0f}% of the {load.cores} cores' time "
            f"({load.others_cores:.2f} cores on average) over {load.wall_s:.1f} s")
    if load.steal_s > 0:
        text += f", {load.steal_s:.2f} s of it stolen by the hypervisor"
    if load.disturbed(threshold):
        text += f": above {100 * threshold:.0f}%, so the machine was busy"
    return text
