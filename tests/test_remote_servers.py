"""The test servers' own counters (tests/remote_servers.py), which the benchmark reports: sshd's
request log against the reads a real paramiko client made, the delaying proxy's bytes against the
bytes that crossed it."""

from __future__ import annotations

from pathlib import Path

import paramiko

from tests.remote_servers import delay_proxy, sshd_server


def test_sftp_requests_and_bytes_counted(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1200  # 307200 bytes
    (tmp_path / "f").write_bytes(data)
    with sshd_server(tmp_path, count_requests=True) as ssh, delay_proxy(ssh.port, tmp_path, 0, 0) as proxy:
        before = proxy.stats()
        client = paramiko.SSHClient()
        client.load_host_keys(str(ssh.known_hosts_for(proxy.port)))
        client.connect("127.0.0.1", port=proxy.port, username=ssh.user, key_filename=str(ssh.identity))
        try:
            sftp = client.open_sftp()
            with sftp.open(str(tmp_path / "f"), "rb") as f:
                got = list(f.readv([(0, 200000), (250000, 1000)]))
            sftp.close()
        finally:
            client.close()
        assert b"".join(got) == data[:200000] + data[250000:251000]
        counts = ssh.sftp_requests()
        stats = proxy.stats()
    # paramiko asks for at most 32 KiB a read: 7 reads for the first range, 1 for the second
    assert counts == {"reads": 8, "ranges": 2, "requests": 8 + 2}  # + the open and the close
    assert stats["connections"] - before["connections"] == 1
    down = stats["bytes_down"] - before["bytes_down"]
    assert 201000 < down < 201000 + 20000  # the data, encrypted, and the handshake
