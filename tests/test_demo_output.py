"""What a newcomer sees on the README's demo: megads' own lines and nothing else (no DeepSpeed
accelerator notice or op build message, no deprecation warning, no traceback)."""
import re

# megads' own lines, each matched whole. No other line is allowed.
OWN = [re.compile(p) for p in (
    r"\d\d:\d\d:\d\d \S.*",                     # its log: "%(asctime)s %(message)s" with "%H:%M:%S" (megads.pretrain)
    r"train loss \S+ -> \S+ over \d+ steps",    # the summary rank 0 prints at the end
    r"valid loss \S+ \(step \d+\) -> \S+ \(step \d+\), \S+ of the first",
    r"run directory: \S+",
    r"megads( launch)?: .*",                    # the entry points' and the launcher's messages
)]
NEVER = ("FutureWarning", "DeprecationWarning", "UserWarning", "Setting accelerator", "Traceback")


def foreign_lines(output: str) -> list[str]:
    """The non-empty lines of `output` that are not megads' own or that carry a warning or a traceback."""
    return [line for line in output.splitlines() if line.strip() and
            (any(word in line for word in NEVER) or not any(p.fullmatch(line) for p in OWN))]


def test_demo_prints_only_megads_lines(demo_run):
    proc = demo_run.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert foreign_lines(proc.stdout) == []
    assert foreign_lines(proc.stderr) == []
