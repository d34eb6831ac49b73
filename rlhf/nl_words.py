"""The word lists behind `rlhf.nl_tasks`: categories, questions, topics (data only).

Kept apart from the task code so each file stays one concern. Every list is plain data;
`tests/test_nl_tasks.py` checks the properties the oracles rely on (no duplicates, the
answer words of different questions disjoint, no topic or related word using its ban).
"""

from __future__ import annotations

# Categories for `brief` and the bulleted lists: singular -> plural, comma-separated items.
# A few items sit in two categories on purpose (orange: fruit and colour; turkey: bird and
# country; heart: body part and shape, ...): naming one counts for either category.
_BIRDS = (
    "eagle,owl,penguin,sparrow,robin,parrot,pigeon,crow,swan,flamingo,ostrich,peacock,hawk,"
    "falcon,duck,goose,seagull,hummingbird,woodpecker,pelican,kiwi,chicken,turkey,dove,"
    "heron,stork,blackbird"
)
_INSECTS = (
    "ant,bee,butterfly,beetle,mosquito,ladybird,ladybug,grasshopper,cricket,dragonfly,wasp,"
    "moth,termite,flea,cockroach,caterpillar"
)
_MAMMALS_ETC = (
    "dog,cat,horse,cow,lion,tiger,elephant,giraffe,zebra,monkey,bear,wolf,fox,rabbit,mouse,"
    "sheep,goat,pig,deer,kangaroo,dolphin,whale,camel,cheetah,panda,squirrel,snake,frog,"
    "shark,hippopotamus,rhino,otter,crocodile,turtle,octopus,salmon,goldfish"
)
_ITEMS = {
    "fruit": "apple,banana,cherry,grape,lemon,mango,orange,peach,pear,pineapple,plum,"
    "strawberry,watermelon,kiwi,apricot,blueberry,raspberry,coconut,papaya,fig,lime,"
    "melon,pomegranate,avocado,tangerine,nectarine,grapefruit",
    "vegetable": "carrot,potato,onion,cabbage,broccoli,spinach,lettuce,pea,cucumber,celery,"
    "cauliflower,garlic,pumpkin,zucchini,beetroot,radish,leek,asparagus,kale,turnip,corn,"
    "sweet potato,bean,eggplant,aubergine,courgette,parsnip,artichoke,mushroom,pepper",
    "animal": f"{_MAMMALS_ETC},{_BIRDS},{_INSECTS}",
    "bird": _BIRDS,
    "insect": _INSECTS,
    "colour": "red,blue,green,yellow,purple,pink,brown,black,white,grey,gray,violet,indigo,"
    "turquoise,magenta,cyan,beige,maroon,navy,teal,gold,silver,crimson,scarlet,orange,lime",
    "country": "france,germany,spain,italy,japan,china,india,brazil,canada,mexico,egypt,"
    "kenya,nigeria,australia,russia,greece,portugal,sweden,norway,ireland,peru,chile,"
    "argentina,vietnam,thailand,turkey,united states,united kingdom,south africa,"
    "new zealand,south korea,poland,netherlands,switzerland,usa,uk,england,scotland",
    "musical instrument": "piano,guitar,violin,drum,flute,trumpet,cello,harp,saxophone,"
    "clarinet,trombone,ukulele,banjo,accordion,oboe,tuba,harmonica,xylophone,bagpipes,"
    "mandolin,tambourine,viola,keyboard",
    "sport": "football,soccer,tennis,basketball,baseball,cricket,rugby,golf,hockey,swimming,"
    "running,cycling,boxing,volleyball,badminton,skiing,surfing,rowing,wrestling,judo,"
    "karate,archery,fencing,sailing,table tennis,gymnastics,climbing,skating",
    "vehicle": "car,bus,train,bicycle,bike,motorcycle,truck,van,tractor,taxi,tram,scooter,"
    "ship,boat,airplane,aeroplane,plane,helicopter,lorry,submarine,ambulance,yacht,canoe,"
    "rocket",
    "flower": "rose,tulip,daisy,lily,sunflower,orchid,daffodil,lavender,violet,poppy,iris,"
    "carnation,marigold,jasmine,lotus,dandelion,peony,chrysanthemum,hibiscus,magnolia",
    "body part": "hand,foot,arm,leg,head,eye,ear,nose,mouth,knee,elbow,finger,toe,shoulder,"
    "neck,heart,brain,stomach,wrist,ankle,chin,lung,liver,thumb",
    "shape": "circle,square,triangle,rectangle,oval,pentagon,hexagon,octagon,star,diamond,"
    "heart,sphere,cube,cylinder,cone,pyramid,trapezoid,rhombus",
    "planet": "mercury,venus,earth,mars,jupiter,saturn,uranus,neptune",
    "piece of clothing": "shirt,trousers,pants,jeans,dress,skirt,jacket,coat,sweater,jumper,"
    "hat,scarf,sock,shoe,boot,glove,belt,shorts,hoodie,tie,vest,cap,blouse,pyjamas",
    "job": "doctor,teacher,nurse,farmer,pilot,chef,cook,lawyer,engineer,dentist,firefighter,"
    "police officer,scientist,artist,plumber,electrician,baker,carpenter,driver,writer,"
    "singer,actor,programmer,mechanic,architect,journalist,accountant,waiter,soldier,vet",
    "tool": "hammer,screwdriver,wrench,drill,pliers,spanner,chisel,shovel,spade,rake,axe,"
    "ladder,tape measure,scissors,crowbar,mallet",
    "metal": "iron,gold,silver,copper,aluminium,aluminum,steel,tin,zinc,nickel,platinum,"
    "titanium,bronze,brass,mercury",
    "day of the week": "monday,tuesday,wednesday,thursday,friday,saturday,sunday",
}
CATEGORIES: dict[str, tuple[str, ...]] = {k: tuple(v.split(",")) for k, v in _ITEMS.items()}
PLURALS = {
    "body part": "body parts",
    "country": "countries",
    "day of the week": "days of the week",
    "piece of clothing": "pieces of clothing",
} | {c: c + "s" for c in _ITEMS if " " not in c and c != "country"}
PLURALS["musical instrument"] = "musical instruments"

# (question, answer words separated by "|", the teacher's answer sentence). Answer words
# are disjoint across questions, and no sentence names another question's answer word.
QUESTIONS: tuple[tuple[str, str, str], ...] = (
    ("what colour is the sky?", "blue", "The sky is blue."),
    ("what colour is grass?", "green", "Grass is green."),
    ("what animal says moo?", "cow", "A cow says moo."),
    ("how many legs does a spider have?", "eight|8", "A spider has eight legs."),
    ("what is the opposite of hot?", "cold", "The opposite of hot is cold."),
    ("what do bees make?", "honey", "Bees make honey."),
    ("what is frozen water called?", "ice", "Frozen water is called ice."),
    ("which planet do we live on?", "earth", "We live on the planet Earth."),
    ("what colour is snow?", "white", "Snow is white."),
    ("how many days are in a week?", "seven|7", "A week has seven days."),
    ("what is the capital of France?", "paris", "Paris is the capital of France."),
    ("what is the opposite of up?", "down", "The opposite of up is down."),
    ("which animal barks?", "dog", "A dog barks."),
    ("which season comes after winter?", "spring", "Spring comes after winter."),
    ("what colour is a ripe banana?", "yellow", "A ripe banana is yellow."),
    ("how many wheels does a bicycle have?", "two|2", "A bicycle has two wheels."),
    ("what is the largest ocean?", "pacific", "The Pacific is the largest ocean."),
    ("what shape has three sides?", "triangle", "A triangle has three sides."),
    ("what gas do we need to breathe?", "oxygen", "We need oxygen to breathe."),
    ("what is the first month of the year?", "january", "January is the first month."),
    ("what do caterpillars turn into?", "butterfly|moth", "Caterpillars turn into butterflies."),
    ("which star gives us daylight?", "sun", "The Sun gives us daylight."),
    ("what colour is a ripe strawberry?", "red", "A ripe strawberry is red."),
    ("what is the opposite of big?", "small|little", "The opposite of big is small."),
    ("how many sides does a square have?", "four|4", "A square has four sides."),
    ("what is the capital of Italy?", "rome", "Rome is the capital of Italy."),
    ("what is the capital of Japan?", "tokyo", "Tokyo is the capital of Japan."),
    ("what is the tallest animal?", "giraffe", "The giraffe is the tallest animal."),
    ("what do we call a baby cat?", "kitten", "A baby cat is called a kitten."),
    ("what do we call a baby dog?", "puppy", "It is called a puppy."),
    ("what is the hottest season?", "summer", "The hottest season is summer."),
    ("what is the opposite of day?", "night", "The opposite of day is night."),
    ("which body part do we see with?", "eye", "We see with our eyes."),
    ("which body part do we hear with?", "ear", "We hear with our ears."),
    ("what do spiders spin?", "web", "Spiders spin webs."),
    ("what is the largest planet?", "jupiter", "Jupiter is the largest planet."),
    ("what is the capital of Spain?", "madrid", "Madrid is the capital of Spain."),
    ("what do hens lay?", "egg", "Hens lay eggs."),
    ("what is the opposite of wet?", "dry", "The opposite of wet is dry."),
    ("which month comes after June?", "july", "July comes after June."),
    ("what meal do we eat in the morning?", "breakfast", "We eat breakfast in the morning."),
    ("what do we call a baby sheep?", "lamb", "A baby sheep is called a lamb."),
    ("which continent is Egypt in?", "africa", "Egypt is in Africa."),
    ("what is the opposite of fast?", "slow", "The opposite of fast is slow."),
)

# (topic, the words a prompt may ban, related words). A reply is on topic when it names
# a related word that the prompt does not ban; the bans are related words themselves.
TOPICS: tuple[tuple[str, str, str], ...] = (
    ("the sea", "water salt", "water salt waves tide fish blue deep shore beach boats"),
    ("the sun", "hot bright", "hot bright light sky star warm yellow shines summer rays"),
    ("winter", "cold snow", "cold snow ice frost freezing coats scarves december chilly"),
    ("the night", "dark moon", "dark moon stars sleep quiet owls black late midnight dreams"),
    ("a forest", "tree green", "trees green leaves wood birds moss paths shade branches pine"),
    ("rain", "wet cloud", "wet clouds drops umbrella grey storm puddles showers drizzle"),
    ("a fire", "hot flame", "hot flames smoke burns heat orange wood glow sparks logs"),
    ("the desert", "sand dry", "sand dry heat dunes camels cactus sun empty dusty oasis"),
    ("a library", "book quiet", "books quiet shelves reading librarian study pages novels"),
    ("a kitchen", "food cook", "food cooking oven stove pots pans knives meals fridge"),
    ("a garden", "flower grass", "flowers grass soil bees green roses lawn seeds plants"),
    ("a city", "building busy", "buildings busy streets cars people noise shops traffic"),
    ("snow", "white cold", "white cold flakes winter ice soft snowman frozen sledge"),
    ("music", "sound song", "sounds songs notes rhythm melody instruments singing band"),
    ("coffee", "drink hot", "drink hot cup beans bitter morning caffeine mug espresso"),
    ("a birthday", "cake party", "cake party candles presents friends balloons gifts"),
    ("the moon", "night sky", "night sky bright round craters stars glow tides space"),
    ("a beach", "sand sea", "sand sea waves shells sunshine towels swimming seagulls"),
    ("a farm", "animal cow", "animals cows tractor barn fields sheep hay crops pigs"),
    ("a hospital", "doctor sick", "doctors sick nurses patients beds medicine care"),
    ("an airport", "plane flight", "planes flights luggage passengers runway gates pilots"),
    ("the mountains", "high snow", "high snow peaks rocks cliffs climbing cold views"),
    ("autumn", "leaves fall", "leaves fall orange brown wind harvest pumpkins october"),
    ("a school", "teacher student", "teachers students lessons classroom desks homework"),
    ("a rainbow", "rain sky", "rain sky arc sunlight colours colors red violet bright"),
    ("a bakery", "bread cake", "bread cakes ovens flour smell pastries sweet morning"),
    ("chocolate", "sweet brown", "sweet brown cocoa sugar bars melts treats milk"),
    ("a thunderstorm", "rain loud", "rain loud lightning thunder clouds wind flashes"),
    ("a zoo", "animal cage", "animals cages lions elephants visitors keepers monkeys"),
    (
        "a train station",
        "platform ticket",
        "platforms tickets passengers tracks clocks trains travel",
    ),
)
