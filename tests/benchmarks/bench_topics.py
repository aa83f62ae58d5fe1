"""Topics of one benchmark run, and the processes of its contenders (not a benchmark itself).

    from bench_topics import fresh_topics   # benchmarks run as scripts, so their folder is on sys.path
"""
import os
import signal
import subprocess
import time

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import UnknownTopicOrPartitionError


def fresh_topics(bootstrap: str, specs: list[tuple[str, int]], drop_prefix: str) -> list[str]:
    """Delete the topics named ``drop_prefix*`` (earlier runs), then create ``specs`` ((name, partitions))."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="onboardflow-bench")
    try:
        old = sorted(name for name in admin.list_topics() if name.startswith(drop_prefix))
        if old:
            try:
                admin.delete_topics(old)
            except UnknownTopicOrPartitionError:
                pass
            deadline = time.time() + 30
            while set(admin.list_topics()) & set(old) and time.time() < deadline:
                time.sleep(0.5)
        admin.create_topics([NewTopic(n, num_partitions=p, replication_factor=1) for n, p in specs])
        return old
    finally:
        admin.close()


def vm_hwm_kb(pid: int) -> int:
    """Peak resident memory (VmHWM, KiB) of process ``pid``; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def interrupt(proc: subprocess.Popen, timeout: float = 120.0, group: bool = True) -> None:
    """SIGINT to ``proc`` (a streaming job's clean stop: Flink's with a savepoint), to its whole process
    group if ``group``; SIGKILL to the group if it has not ended within ``timeout`` seconds. ``proc``
    must lead its group (``start_new_session=True``)."""
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
