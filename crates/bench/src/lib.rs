//! amiflow's benchmarks that call EC2, SSM and Auto Scaling; see `src/bin/`.
