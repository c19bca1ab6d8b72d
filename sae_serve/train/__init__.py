"""Dictionary learning, the paper's method: corpus, harvest, train, evaluate, calibrate."""
