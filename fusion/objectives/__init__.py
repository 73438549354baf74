"""What the student is trained towards: source selection, the fusion rule and the losses.

`selection` is the selector network S(x) with noisy top-k and its prefit; `fusion_rule` turns
the selected sources' distributions into the target (the weights alpha, dynamic or a baseline's,
the fused sparse target on the union support, the gold one-hot fill); `losses` holds every loss:
the sparse KL and other divergences, the student loss, the selector's regression and feedback
(balancing) losses. `methods` is the table of methods (the baselines and the selector) as
settings of one rule; `srft_losses` are the SRFT stage's objectives.
"""
