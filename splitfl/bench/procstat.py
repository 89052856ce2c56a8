"""What the load benchmarks read of their processes from /proc, and the CSV and percentile helpers they share.

:mod:`splitfl.bench.split_load` and :mod:`splitfl.bench.clinic_load` watch one real server process (and the
former its hospital processes too) while it runs: CPU, memory, threads, TCP connections. They read /proc
directly, so the benchmarks need no psutil and run wherever the server does (Linux); a reading of a process
that has exited is None, not an error, because the processes end on their own when the run is over.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TICK", "ProcStat", "Sample", "Sampler", "machine_busy_s", "percentile", "proc_stat", "read_rows",
           "tcp_connections"]

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # clock ticks a second: /proc's unit of CPU time


@dataclass(frozen=True)
class ProcStat:
    """One reading of a live process."""

    cpu_s: float  # user + system CPU seconds since it started
    rss_mb: float  # resident memory now
    hwm_mb: float  # resident memory's high-water mark (peak RSS), kept by the kernel between readings
    threads: int
    pss_mb: float = math.nan  # proportional set size; nan unless asked for (see proc_stat)


def proc_stat(pid: int, pss: bool = False) -> ProcStat | None:
    """CPU seconds, RSS, peak RSS and threads of process ``pid`` (with ``pss``, its PSS too); None once it is gone.

    PSS (proportional set size) shares each shared page among the processes mapping it, so the PSS of N
    hospitals adds up to the memory they really take (their RSS counts torch's libraries N times). It is read
    only when asked for: /proc/PID/smaps_rollup walks the process's page tables, which a server under load
    should not pay for every sample.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text() if pss else ""
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and ')'
    kv = {line.split(":")[0]: line.split()[1] for line in (status + rollup).splitlines()
          if line.startswith(("VmRSS:", "VmHWM:", "Threads:", "Pss:"))}
    return ProcStat(cpu_s=(int(fields[11]) + int(fields[12])) / TICK,  # utime + stime
                    rss_mb=int(kv.get("VmRSS", 0)) / 1024, hwm_mb=int(kv.get("VmHWM", 0)) / 1024,
                    threads=int(kv.get("Threads", 0)), pss_mb=int(kv.get("Pss", 0)) / 1024 if pss else math.nan)


def tcp_connections(pid: int) -> int:
    """ESTABLISHED TCP sockets held by process ``pid`` (its fds matched with /proc/PID/net/tcp{,6}); 0 if gone."""
    inodes = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(fd.path)
            except OSError:  # the fd closed while being listed
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return 0
    n = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "01" and f[9] in inodes:  # st 01: ESTABLISHED; field 9: the socket's inode
                n += 1
    return n


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (every core; /proc/stat, not idle or iowait); nan if unreadable.

    Beside a process's own CPU this tells how much of the machine other jobs took, which a shared machine's
    timings need.
    """
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return math.nan
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / TICK


@dataclass(frozen=True)
class Sample:
    """One :meth:`Sampler.sample` of a live process."""

    t: float  # unix time of the reading (comparable with the servers' steps.csv times)
    proc: ProcStat
    connections: int  # its ESTABLISHED TCP sockets; 0 unless the sampler counts them
    others_cpu_s: float  # CPU seconds of the sampler's other processes still alive, added up
    machine_busy_s: float  # the machine's busy CPU seconds; nan unless the sampler reads them


class Sampler:
    """Readings of one process (a server), and optionally of others (its clients) and the machine, over a run.

    The benchmark calls :meth:`sample` from the loop in which it waits for the server, every ``--sample-s``
    seconds, so sampling stops with the server without a thread of its own; the spans asked of it afterwards are
    the spans the server's own CSV files name (unix times).
    """

    def __init__(self, pid: int, others: Sequence[int] = (), *, connections: bool = False,
                 machine: bool = False) -> None:
        self.pid, self.others = pid, list(others)
        self.count_connections, self.read_machine = connections, machine
        self.samples: list[Sample] = []
        self.others_pss_peak_mb = 0.0  # the others' PSS added up, the largest reading (read even once pid is gone)

    def sample(self) -> None:
        """One reading of the process (none once it is gone), of the others (with their PSS) and of the machine."""
        proc = proc_stat(self.pid)
        others = [o for o in (proc_stat(pid, pss=True) for pid in self.others) if o is not None]
        if proc is not None:
            self.samples.append(Sample(t=time.time(), proc=proc,
                                       connections=tcp_connections(self.pid) if self.count_connections else 0,
                                       others_cpu_s=sum((o.cpu_s for o in others), 0.0),
                                       machine_busy_s=machine_busy_s() if self.read_machine else math.nan))
        self.others_pss_peak_mb = max(self.others_pss_peak_mb, sum((o.pss_mb for o in others), 0.0))

    def window(self, t0: float, t1: float, or_last: bool = False) -> list[Sample]:
        """The samples taken between unix times t0 and t1.

        With ``or_last``, the last sample when none was taken inside: a span shorter than the sampling period
        (a quick FedAvg round) still gets a reading of memory and threads.
        """
        inside = [s for s in self.samples if t0 <= s.t <= t1]
        return inside or (self.samples[-1:] if or_last else [])

    def cores(self, t0: float, t1: float, or_last: bool = False) -> dict[str, float]:
        """Cores busy from the first to the last sample of the window: the process, the others added up, the machine.

        nan with fewer than two samples (no time between them to divide by).
        """
        inside = self.window(t0, t1, or_last)
        if len(inside) < 2 or inside[-1].t <= inside[0].t:
            return {"proc": math.nan, "others": math.nan, "machine": math.nan}
        a, b = inside[0], inside[-1]
        dt = b.t - a.t
        return {"proc": (b.proc.cpu_s - a.proc.cpu_s) / dt, "others": (b.others_cpu_s - a.others_cpu_s) / dt,
                "machine": (b.machine_busy_s - a.machine_busy_s) / dt}

    def between(self, t0: float, t1: float, or_last: bool = False) -> dict[str, float]:
        """The process over the window: median RSS, most threads and connections, cores busy (see :meth:`cores`)."""
        inside = self.window(t0, t1, or_last)
        return {"rss_mb_median": statistics.median(s.proc.rss_mb for s in inside) if inside else math.nan,
                "threads_max": max((s.proc.threads for s in inside), default=0),
                "connections_max": max((s.connections for s in inside), default=0),
                "cpu_cores": self.cores(t0, t1, or_last)["proc"]}

    def peak(self) -> dict[str, float]:
        """The process over every sample: peak RSS (the kernel's high-water mark), most threads and connections."""
        return {"rss_mb_peak": max((s.proc.hwm_mb for s in self.samples), default=math.nan),
                "threads_peak": max((s.proc.threads for s in self.samples), default=0),
                "connections_peak": max((s.connections for s in self.samples), default=0)}


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows as dicts of strings; none while the file is not written yet (a server still starting)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between the closest ranks; nan if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
