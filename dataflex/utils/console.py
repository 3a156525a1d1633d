"""What a run prints: a copy of the console in RUN_DIR/train.log, and third-party logging kept quiet."""
from __future__ import annotations

import sys

NOISY_LOGGERS = ("megatron", "megatron_fsdp", "DeepSpeed", "deepspeed", "compilers", "matplotlib", "torch.distributed", "datasets",
                 "transformer_engine", "apex", "numexpr")


class _Tee:
    """Console writes also go to train.log (a redrawn progress line is kept once, in its last state)."""

    def __init__(self, stream, log):
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, s):
        n = self.stream.write(s)
        try:
            self.pending += s
            if "\n" in self.pending:
                lines = self.pending.split("\n")
                self.pending = lines.pop()
                self.log.write("".join(line.rsplit("\r", 1)[-1] + "\n" for line in lines))
                self.log.flush()
            self.pending = self.pending.rsplit("\r", 1)[-1]
        except ValueError:  # log closed
            pass
        return n

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class ConsoleLog:
    """Everything printed to stdout and stderr also lands in RUN_DIR/train.log, errors included."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.log = open(self.path, "a", encoding="utf-8")
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.log), _Tee(sys.stderr, self.log)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and not (exc_type is SystemExit and not exc.code):
            import traceback

            text = str(exc.code) if exc_type is SystemExit else "".join(
                traceback.format_exception(exc_type, exc, tb))
            self.log.write(text.rstrip("\n") + "\n")
        for tee in (sys.stdout, sys.stderr):
            if isinstance(tee, _Tee) and tee.pending:
                self.log.write(tee.pending + "\n")
        sys.stdout, sys.stderr = self.saved
        self.log.close()
        return False


def quiet_third_party(verbose: bool) -> None:
    """Third-party INFO chatter (megatron's index readers, DeepSpeed's op builder, matplotlib's font cache)
    is silenced unless logger.verbose=true."""
    import logging
    import warnings

    level = logging.INFO if verbose else logging.WARNING
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose:
        for module in ("megatron", "transformer_engine", "apex", "deepspeed"):
            warnings.filterwarnings("ignore", module=module)
        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|transformer_engine|apex).*")
