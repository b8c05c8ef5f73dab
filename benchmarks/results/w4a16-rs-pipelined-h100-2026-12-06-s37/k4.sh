#!/usr/bin/env bash
# call 4 (session 37): ncu on the shipped RS kernel (4096 x 4096, M = 128 and 256): where a block's time goes
export PYTHONPATH=.
timeout 150 ncu --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
  --section LaunchStats -k regex:wna16_gluon_rs -s 2 -c 2 python gpu/prof.py > $OUT/ncu.txt 2>&1
echo "ncu rc $?"
grep -v "^==PROF==" $OUT/ncu.txt | grep -E "wna16|Duration|Throughput|Stall|Warp Cycles|Issued|Eligible|Active Warps|No Eligible|Registers|Achieved|Theoretical Occ|Block Limit|Grid Size|One or More|Dynamic Shared|L2 Cache Th|DRAM Th|Memory Th|Compute \(SM\)" | head -80
