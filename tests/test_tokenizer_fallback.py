"""The pure-Python PTB tokenizer against coco-caption's Java PTBTokenizer (CoreNLP 3.4.1)."""

import shutil

import pytest

from micl.evaluation import caption, ptb

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="no java on PATH")

# ~100 captions in the styles of COCO/Flickr30k, AudioCaps, MSR-VTT and model outputs.
CORPUS = """\
A man riding a wave on top of a surfboard.
Two dogs playing with a frisbee in the park!
A black-and-white photo of a 1950s diner.
The woman's hat is red, and her dress is blue.
A child's toy sits on the floor; nobody's playing with it.
"Stop" is written on the red sign.
A sign that reads 'No Parking' next to a fire hydrant.
Three people (two adults and a kid) walk down the street.
A 5-year-old boy eats a slice of pizza at 12:30 p.m.
It's a sunny day at the beach, isn't it?
They're sitting on a bench... waiting for the bus.
A dog doesn't want to get into the bath -- it's cold.
A plate with 2 eggs, 3 strips of bacon and 1/2 of a tomato.
The price tag says $4.99 at the 7-Eleven store.
A train pulls into the station at 10:45 AM.
Mr. Smith and Dr. Jones shake hands in front of St. Paul's Cathedral.
A cat sleeping on a laptop keyboard.
Someone is frying onions in a pan while a dog barks.
A crowd cheers loudly as a car engine revs.
Birds chirp, then a door slams shut.
Rain falls on a tin roof & thunder rumbles in the distance.
A woman speaks over the sound of running water
An engine idles and a horn honks twice.
Wind blows hard into a microphone; leaves rustle.
A man is talking about the U.S. economy on TV.
A girl's playing guitar and singing "Happy Birthday."
A cartoon character dances around a pink room.
A chef demonstrates how to make pasta step-by-step.
People are playing soccer on a field at night.
A group of kids jumping into a swimming pool.
The man can't find his keys, so he checks his coat.
We'll see a plane taking off from the runway.
A herd of elephants crossing a dirt road.
An old man with a long, white beard reads a newspaper.
A red double-decker bus drives down a busy London street.
A young boy in a blue t-shirt swings a baseball bat.
A large jet flying over a city skyline at dusk.
A kitchen with stainless-steel appliances and granite countertops.
Two giraffes standing next to each other in a zoo enclosure.
A bowl of fruit: apples, bananas, and oranges.
A man holds up a "SOLD" sign in front of a house.
There are 10 sheep grazing on a green hillside.
A motorcycle parked in front of a café.
A woman with an umbrella walks in the rain.
A clock tower shows it's ten o'clock.
An x-ray image of a human hand.
A tennis player hits a backhand during a match.
The skateboarder does a trick off the ramp!!
Is that a bear in the woods?
A small brown dog wearing a Santa hat.
A man and a woman cut a wedding cake together.
A pizza with pepperoni, mushrooms & olives.
Children (ages 6-8) are playing tag in a backyard.
A boat floats on a calm lake near the mountains.
A bathroom with a white toilet and a sink
A person snowboarding down a snowy slope.
A vase of flowers sitting on a wooden table.
Kids are flying kites on a windy day at the beach.
A laptop, a cup of coffee, and a notebook on a desk.
A stop sign with graffiti on it.
A woman’s hand holding a smartphone.
a man on a horse in a field
A MAN SKIING DOWN A HILL.
A baby elephant follows its mother.
The bus is 20 minutes late; passengers look annoyed.
A surfer rides a 10-foot wave.
Someone is typing on a keyboard; a phone rings.
A dog barks while cars pass by on a highway.
Water trickles from a faucet into a metal sink.
A crowd applauds after a speech.
Footsteps on gravel, followed by a gate creaking open.
A man shouts, "Watch out!" and a horn blares.
A baby is crying while a woman tries to soothe it.
An ambulance siren wails as it passes.
A cat meows repeatedly -- it seems hungry.
Thunder rolls; heavy rain pours down.
A helicopter's blades whir overhead.
A drill whines, then stops abruptly.
People laugh and chat at a party.
A video game character jumps over obstacles.
A news anchor reports on the weather forecast.
A woman applies make-up in front of a mirror.
A man explains how to fix a bike tire.
Two men are wrestling in a ring.
A girl is brushing her dog's fur.
A band performs on stage under bright lights.
A car drives along a coastal road at sunset.
Players celebrate after scoring a goal.
A person slices a cucumber on a cutting board.
A cat chases a laser pointer across the floor.
What color is the bus? It's yellow.
How many people are there? There are 4.
The answer is no.
A man wearing a 3-piece suit and a bow-tie.
A 2-story house with a white picket fence.
A 100m sprint at the 2012 Olympics.
The temperature is 75°F and it's 50% humid.
An e-mail from a co-worker on a computer screen.
A well-known actor signs autographs for fans.
A woman wearing a T-shirt that says “I <3 NY”.
Rock 'n' roll music plays on the radio.
A close-up of a dog's nose.
He's holding a 12-pack of soda.
A store's window display, full of toys.
""".splitlines()

# Tokens the jar produced for these captions, tokenised together in this order (its look-ahead
# crosses lines: "Mo." gets a sentence-final "." because the next line starts with a capital).
GOLDEN = [
    ("Two dogs don't like the cat's toy (it's red).",
     "two dogs do n't like the cat 's toy -lrb- it 's red -rrb- ."),
    ('He said "hello" to the colour-blind man\'s dog...',
     "he said `` hello '' to the colour-blind man 's dog ..."),
    ("It can't be 3.5 or 1,000 people -- at 10% and $5.",
     "it ca n't be 3.5 or 1,000 people -- at 10 % and $ 5 ."),
    ("A black-and-white photo of a U.S. Army truck in St. Louis, Mo.",
     "a black-and-white photo of a u.s. army truck in st. louis , mo. ."),
    ("I'm gonna see Mr. Smith at 10:30 a.m. on Jan. 5th!!",
     "i 'm gon na see mr. smith at 10:30 a.m. on jan. 5th !!"),
    ("Rock 'n' roll at the '90s party, 1 1/2 hours; ok?!",
     "rock 'n' roll at the '90s party , 1\xa01/2 hours ; ok ?!"),
    ("A dog/cat e-mail: x-ray T-shirt 5-year-old o'clock",
     "a dog/cat e-mail : x-ray t-shirt 5-year-old o'clock"),
    ("The answer is no. 5 is wrong", "the answer is no. 5 is wrong"),
]


def _cider_inputs(captions):
    """Predictions and 3 references each, all drawn from the corpus (deterministic)."""
    n = len(captions)
    preds = [captions[(i * 7 + 3) % n] if i % 3 == 0 else captions[i] for i in range(n)]
    refs = [[captions[i], captions[(i + 1) % n], captions[(i + 5) % n]] for i in range(n)]
    return preds, refs


def test_corpus_size():
    assert len(CORPUS) >= 100 and all(c.strip() for c in CORPUS)


def test_fallback_golden_tokens():
    got = ptb.python_ptb_tokenize([c for c, _ in GOLDEN])
    assert [" ".join(t) for t in got] == [g for _, g in GOLDEN]
    assert ptb.tokenize_captions([GOLDEN[0][0]], use_java=False) == ["two dogs do n't like the cat 's toy -lrb- it 's red -rrb-"]


@needs_java
def test_java_golden_tokens():
    got = ptb.java_ptb_tokenize([c for c, _ in GOLDEN])
    assert [" ".join(t) for t in got] == [g for _, g in GOLDEN]


@needs_java
def test_fallback_agrees_with_java_ptb():
    java = ptb.java_ptb_tokenize(CORPUS)
    py = ptb.python_ptb_tokenize(CORPUS)
    raw_equal = sum(a == b for a, b in zip(java, py)) / len(CORPUS)
    final_equal = sum(ptb.remove_punctuation(a) == ptb.remove_punctuation(b) for a, b in zip(java, py)) / len(CORPUS)
    print(f"PTB agreement on {len(CORPUS)} captions: raw tokens {raw_equal:.1%}, after punctuation removal {final_equal:.1%}")
    assert raw_equal >= 0.95
    assert final_equal >= 0.98

    preds, refs = _cider_inputs(CORPUS)
    with_java = caption.compute_caption_metrics(preds, refs, use_java=True, meteor=False)
    without = caption.compute_caption_metrics(preds, refs, use_java=False, meteor=False)
    assert with_java["tokenizer"] == "java" and without["tokenizer"] == "python"
    for key in ("cider", "bleu_1", "bleu_4", "rouge_l"):
        assert without[key] == pytest.approx(with_java[key], abs=1e-6), key


def test_switches_force_the_fallback(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Java tokenizer must not be called")

    monkeypatch.setattr(ptb, "java_ptb_tokenize", boom)
    expected = ["a man riding a wave on top of a surfboard"]
    assert ptb.tokenize_captions(CORPUS[:1], use_java=False) == expected
    monkeypatch.setenv("MICL_NO_JAVA", "1")
    assert not ptb.java_available()
    assert ptb.tokenize_captions(CORPUS[:1]) == expected
    out = caption.compute_caption_metrics(CORPUS[:3], [[c] for c in CORPUS[:3]])
    assert out["tokenizer"] == "python" and out["meteor"] is None


def test_use_java_true_without_java(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not ptb.java_available()
    with pytest.raises(RuntimeError, match="java"):
        ptb.tokenize_captions(["a dog"], use_java=True)


@pytest.mark.parametrize("use_java", [pytest.param(True, marks=needs_java), False])
def test_line_breaks_and_empty_captions_stay_aligned(use_java):
    caps = ["", "A dog\r\nruns.", "a cat\u2028sleeps", "", "   ", "Birds (two) sing.", ""]
    out = ptb.tokenize_captions(caps, use_java=use_java)
    assert out == ["", "a dog runs", "a cat sleeps", "", "", "birds -lrb- two -rrb- sing", ""]
