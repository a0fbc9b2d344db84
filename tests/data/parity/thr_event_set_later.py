import threading
ready = threading.Event()
def waiter():
    ready.wait()
    print('released')
t = threading.Thread(target=waiter)
t.start()
ready.set()
t.join()
