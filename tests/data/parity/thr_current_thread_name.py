import threading
def show():
    print(threading.current_thread().name)
t = threading.Thread(target=show, name='worker-1')
t.start()
t.join()
print(threading.current_thread().name)
