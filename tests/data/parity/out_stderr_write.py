import sys
sys.stderr.write('warn\n')
print('out')
