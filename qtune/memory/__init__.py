"""Memory of fine-tuning: the byte accounting (`accounting`), the peak predictor behind `qtune estimate`
(`estimate`), a tensor-lifetime tracer that replays a step on fake tensors (`tracer`, `step`), and the
measured CPU peak of a real step (`measure`)."""
