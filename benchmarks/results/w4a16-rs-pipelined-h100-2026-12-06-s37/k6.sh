W4G_SHIPPED=1 W4G_QUICK=1 timeout 120 python gpu/w4g.py > $OUT/w4g-final.log  # call 6 (session 37), PYTHONPATH=.
