"""The commands users run, behind pretrain.py and tools/: pretrain, finetune, linear_probe, knn
(commands.py), predict (predict.py), visualize (visualize.py); how each ends on a mistake or a stop
(exits.py) and the argument types they share (arguments.py). The top layer: nothing imports it."""
