"""The released MAT-Coding eval's crop override: the question's box (0-1000) replaces a crop step's slices."""
from varft.tools import code


def test_question_box():
  assert code.question_box("Read the sign in [12, 340, 560, 999] please") == (12, 340, 560, 999)
  assert code.question_box("boxes [1, 2, 3, 4] and [5, 6, 7, 8]") == (1, 2, 3, 4)
  assert code.question_box("no box [1.5, 2, 3, 4] here") is None
  assert code.question_box("What is written?") is None


def test_override_replaces_every_two_d_slice_with_the_box_in_pixels():
  # box (100, 200, 500, 600) on 640 x 480: x 64..320, y 96..288
  program = ("img = cv2.imread('path_to_input_image.jpg')\n"
             "a = img[ 10 : 20 , 30:40 ]\n"
             "b = img[int(h * 0.1):int(h * 0.9), w // 4:img.shape[1]]\n"
             "c = img[1:2]\n"
             "d = img[1:2:3, 4:5]\n"
             "e = img[y1:y2, x1:x2, :]\n")
  out, count = code.override_crop(program, (100, 200, 500, 600), 640, 480)
  assert count == 2
  assert out == ("img = cv2.imread('path_to_input_image.jpg')\n"
                 "a = img[96:288, 64:320]\n"
                 "b = img[96:288, 64:320]\n"
                 "c = img[1:2]\n"
                 "d = img[1:2:3, 4:5]\n"
                 "e = img[y1:y2, x1:x2, :]\n")


def test_override_truncates_pixels_as_int():
  out, count = code.override_crop("img[a:b, c:d]", (333, 1, 999, 1000), 101, 7)
  # 333/1000*101 = 33.6 -> 33; 1/1000*7 -> 0; 999/1000*101 = 100.9 -> 100; 1000/1000*7 = 7
  assert (out, count) == ("img[0:7, 33:100]", 1)
