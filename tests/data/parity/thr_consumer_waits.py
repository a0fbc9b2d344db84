import threading, queue
q = queue.Queue()
def consumer():
    print('got', q.get())
t = threading.Thread(target=consumer)
t.start()
q.put(42)
t.join()
