"""The global salt of every cell fingerprint.

Bumping SYSTEM_EPOCH (``orchestrator epoch bump``) makes every cell RUNNABLE with reason
EPOCH_CHANGED on the next plan.
"""

SYSTEM_EPOCH = 1
