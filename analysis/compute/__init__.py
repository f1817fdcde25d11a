"""Where and how numbers are computed: threads or a cluster under a memory limit, and the streaming sums
over real positions that every analysis builds on."""
