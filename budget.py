"""A run's length under a wall-time budget (``--time_budget MINUTES``), for the classifier and FCMAE epoch loops.

After the first epoch the run fixes its length: as many whole epochs as fit in what is left of the budget, at most
``--epochs``. After each later epoch it computes that again from the mean epoch time so far (a shared machine's
speed drifts): it shortens the length when the epochs turn out slower than estimated, and lengthens it when more
epochs would fit even at ``LENGTHEN_MARGIN`` times that mean (so one slow epoch early on does not cost the rest of
the budget, and a length near the edge does not go back and forth). Each change rebuilds the LR schedule for the
new length from the current update on, so the cosine still ends at ``--min_lr`` on the last epoch. Ultralytics
YOLO's ``time`` argument has the same aim (it recomputes the length every epoch, both ways). The length, the
seconds spent and the epoch times are kept in the checkpoint, so a resumed run goes on with them.
"""
import logging
import statistics
import time

from distributed import broadcast_object, is_main_process

log = logging.getLogger('budget')

LENGTHEN_MARGIN = 1.1  # a longer run must still fit with epochs this many times slower than their mean so far


def epochs_within_budget(budget_s, elapsed_s, epoch_s, done, most, reserve_s=0.0):
    """How many epochs a run can have: those done plus as many whole epochs as fit in what is left of the budget
    after the run so far and a reserve for what follows the last epoch (the test evaluation).

    Args:
        budget_s: float, seconds for the whole run. elapsed_s: float, seconds the run has taken (start-up, data,
            precision probe, the ``done`` epochs). epoch_s: float, seconds one more epoch takes (training and
            validation); <= 0 means unknown (no limit). done: int, epochs run. most: int, the upper bound
            (``--epochs``). reserve_s: float, seconds.

    Returns:
        int in [min(done, most), most]: ``done`` when the budget is spent already.
    """
    more = int((budget_s - elapsed_s - reserve_s) // epoch_s) if epoch_s > 0 else most
    return min(most, max(done, done + more))


class TimeBudget:
    """The length of one run under ``--time_budget`` (see the module docstring).

    Args:
        minutes: float > 0, or None for no budget (then ``end_epoch`` changes nothing and ``length`` is ``most``).
        most: int, ``--epochs``: the upper bound.
        saved: the ``state()`` dict kept in the checkpoint the run resumes from, or None.
        resumed_from: str, that checkpoint's path (for the warning when it was written without a budget).
        started: float, ``time.time()`` when this process began the run (default: now).
    """

    def __init__(self, minutes, most, saved=None, resumed_from=None, started=None):
        self.budget_s = minutes * 60 if minutes else None
        self.most = most
        saved = saved or {}
        self.epochs = saved.get('epochs')  # None until the first epoch has fixed it
        self.spent_s = float(saved.get('spent_s', 0.0))  # seconds of the run's earlier processes
        self.epoch_times = [float(t) for t in saved.get('epoch_times', [])]
        self.t_start = time.time() if started is None else started
        if self.budget_s and resumed_from and self.epochs is None:
            log.warning(f'--time_budget: {resumed_from} was written without one; the run keeps --epochs {most}')
            self.budget_s = None

    @property
    def length(self):
        """int: the run's epoch count as it stands."""
        return self.epochs or self.most

    def elapsed_s(self):
        """float: seconds the run has taken, its earlier processes included."""
        return self.spent_s + time.time() - self.t_start

    def state(self):
        """dict to keep in the checkpoint (plain numbers and a list: nothing that runs code when read back)."""
        return {'epochs': self.epochs, 'spent_s': self.elapsed_s(), 'epoch_times': list(self.epoch_times)}

    def end_epoch(self, done, epoch_s, reserve_s, lr_scheduler, rebuild):
        """Record a finished epoch and fix (after the first), shorten or lengthen the length (see the module
        docstring); under torchrun the first process decides for all.

        Args:
            done: int, epochs finished. epoch_s: float, that epoch's seconds, training and validation, less the
                first steps' warm-up (``engine.warm_up_excess``); one more epoch is estimated as the mean of these.
            reserve_s: float, seconds kept for what follows the last epoch. lr_scheduler: the current schedule.
            rebuild: callable(int epochs) -> the LR schedule for that length, set for the next update.

        Returns:
            the LR schedule to go on with (``rebuild``'s when the length changed, else ``lr_scheduler``).
        """
        if self.budget_s is None:
            return lr_scheduler
        self.epoch_times.append(epoch_s)
        mean_s, elapsed_s = statistics.fmean(self.epoch_times), self.elapsed_s()
        fits = epochs_within_budget(self.budget_s, elapsed_s, mean_s, done, self.most, reserve_s)
        if self.epochs is not None and fits > self.epochs:  # longer only with room to spare
            fits = max(self.epochs, epochs_within_budget(self.budget_s, elapsed_s, mean_s * LENGTHEN_MARGIN, done,
                                                         self.most, reserve_s))
        length = broadcast_object(fits)
        if length == self.epochs:
            return lr_scheduler
        if is_main_process():
            what = ('fixed at' if self.epochs is None else
                    f'{"shortened" if length < self.epochs else "lengthened"} from {self.epochs} to')
            print(f'--time_budget {self.budget_s / 60:g} min: {elapsed_s:.0f} s so far, about '
                  f'{mean_s:.0f} s an epoch: length {what} {length} epoch(s) of at most '
                  f'{self.most}', flush=True)
        self.epochs = length
        return rebuild(length)
