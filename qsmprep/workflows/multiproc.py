"""Nipype's MultiProc plugin, made to survive the loss of a worker process.

When a worker dies without returning (the kernel's out-of-memory killer, a stray ``kill``), Nipype's
``MultiProcPlugin`` never learns the fate of the nodes it was running: their results never arrive, the
pool is broken for every later node, and ``qsmprep`` waited for ever (nipype 1.11). Here such nodes fail
with an error that says what happened, the pool is replaced, and the other runs go on.
"""

import multiprocessing
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from nipype.pipeline.plugins.multiproc import MultiProcPlugin as NipypeMultiProcPlugin
from nipype.pipeline.plugins.multiproc import process_initializer


WORKER_LOST = ("WorkerLostError: its worker process ended without a result (killed, most often by the "
               "out-of-memory killer when the machine or job ran out of memory): give the job more memory, or fewer "
               "parallel processes (--nprocs, --mem); running the same command again resumes from the finished "
               "steps.\n")
"""A lost node's error, the one line of its crash file's traceback."""


class MultiProcPlugin(NipypeMultiProcPlugin):  # the name Nipype derives "MultiProc" from, as for its own
    """``MultiProcPlugin`` whose nodes fail with ``WORKER_LOST`` when their worker process dies, and with the
    exception when the worker cannot run them or send their result back (Nipype waited for ever for both)."""

    def _async_callback(self, future):
        if not future.cancelled() and future.exception() is None:  # a lost worker or a failed call: _get_result
            super()._async_callback(future)

    def _get_result(self, taskid):
        future = self._task_obj[taskid]
        if not future.done() or (not future.cancelled() and future.exception() is None):
            return super()._get_result(taskid)
        if future.cancelled() or isinstance(future.exception(), BrokenProcessPool):
            self._replace_broken_pool()
            error = WORKER_LOST
        else:  # the worker could not run the node or send its result back (one that cannot be pickled, say)
            error = "".join(traceback.format_exception(future.exception()))
        # the failure as run_node reports a node's exception: Nipype then writes its crash file and goes on
        return {"result": None, "taskid": taskid, "traceback": [error]}

    def _replace_broken_pool(self):
        """A new pool for the nodes still to run: a broken one refuses every submission."""
        if not getattr(self.pool, "_broken", False):
            return
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = ProcessPoolExecutor(max_workers=self.processors, initializer=process_initializer,
                                        initargs=(self._cwd,),
                                        mp_context=multiprocessing.get_context(self.plugin_args.get("mp_context")))
