import threading
def boom():
    raise ValueError('in thread')
t = threading.Thread(target=boom)
t.start()
t.join()
print('main continues')
