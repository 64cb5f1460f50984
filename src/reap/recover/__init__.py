"""Recovery: what reap does after choosing which experts stay, to win back what the cut loses.

Per MoE layer (and MTP module), while calibration has the layer's weights and a sample of its inputs on the device:

* :mod:`reap.recover.weights`: one expert's weights in transformers' layout (the experts module's tensors), the
  intermediate neurons of each tensor, their alignment between two experts (permutation matching) and the merge
  formula (a weighted average of aligned experts);
* :mod:`reap.recover.methods`: the merge methods (a registry: ``fold``, ``ream``), each proposing which pruned
  experts go into which kept expert;
* :mod:`reap.recover.sample`: the layer's output error on the sample (the unpruned layer against the pruned or
  merged one, routed by the model's own router), the objective every proposal is accepted or refused by;
* :mod:`reap.recover.refit`: the router re-fit (the kept router rows fitted to the unpruned layer's output);
* :mod:`reap.recover.observer`: the layer observer the job hands calibration; its result is a plan with merges
  (:class:`reap.selection.plan.ExpertPlan`) and new router rows, which the rewrite writes.
"""
