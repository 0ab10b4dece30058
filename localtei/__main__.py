"""`python -m localtei`: see localtei.cli."""

import logging
import os
import sys

from localtei.cli import main

code = main()
# The server has stopped and said "Done": skip the interpreter's teardown of torch and
# grpc, which takes seconds and makes every stop (and restart) that much slower.
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
