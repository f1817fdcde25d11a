"""The logit lens at capture time: the head, its statistics, their CPU and CUDA kernels, and the stage."""
