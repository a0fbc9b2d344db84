import sys
sys.stdout.buffer.write(b'bytes\n')
sys.stdout.flush()
