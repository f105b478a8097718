from procs import run_python

from shmkit import Segment


def test_write_visible_to_unrelated_process(backend, seg_name):
    with Segment.create(seg_name, size=4096, backend=backend) as seg:
        run_python("import sys, shmkit\n"
                   "s = shmkit.Segment.open(sys.argv[1], backend=sys.argv[2])\n"
                   "s.buf[0] = 7\n"
                   "s.close()",
                   seg_name, backend, timeout=30)
        assert seg.buf[0] == 7
        seg.unlink()
